#!/usr/bin/env python3
"""End-to-end poll benchmark: one xtcp poll against the kernel's floor and
against ss, at several socket counts, measured side by side.

Run as root via `make bench-e2e` (builds the release binaries first). For
each size a socket farm (several processes) holds the connections in a
private namespace; then, REPS times and in rotated order, inside it:

- floor: `xtcp-dump-floor`, the exporter's two dump requests only drained,
         one thread per family as the exporter reads them;
- ss:    `ss -tinmH > /dev/null`, what a user would run instead;
- xtcp:  `xtcp --max-loops 1`, every record sent over UDP to a counting
         receiver (`xtcp-debug-server --format count`): the default
         layout, one dump of both families;
- xtcp per-family: the same with `--dump-layout per-family`, one dump per
         family read in parallel;
- xtcp prom / xtcp aggregates: the default layout with its metrics
         endpoint (on a free port), the per-service aggregates off
         (`--no-aggregates`) and on: what the aggregates cost (`--no-prom`,
         as in the runs above, turns them off too: nothing would read them);

and the same kernel work laid out differently (`xtcp-dump-floor` options),
for the "beyond the floor" question:

- sequential:   both family dumps on one thread, one after the other;
- all-families: one `TCPDIAG_GETSOCK` dump returning both families;
- split:        each family's dump cut in two by source port with
                `INET_DIAG_REQ_BYTECODE` (ports below 32768 and the rest:
                the farm's listeners and its clients, even halves), four
                sockets read in parallel.

Each runs as `/usr/bin/time -o F -f %M nsenter --net=NS PROGRAM`: wall
time is taken around it and CPU time (user + system) from wait4, both
including the two small launchers; peak RSS is GNU time's (the program's,
after nsenter's exec; a fork of this Python script would count its own
13 MiB). The same figures for `true` are printed as the launchers' share.
Needs GNU time (Debian package time) and nsenter (util-linux). Prints
Markdown tables of medians and the ratios.

The floor, the all-families floor and both xtcp layouts also run 3 times
in one process (`xtcp-dump-floor --repeat 3`, `xtcp --max-loops 3
--frequency 1ms`): (3 runs - 1 run) / 2 is what one poll of the running
daemon costs, without the start.

The summary also gives the kernel memory the farm's sockets take (the
growth of `Slab` in /proc/meminfo while the farm is up) and the records the
receiver did not get (sockets x polls - records received, the most of any
run).

SIZES (sockets, default "10000 100000 200000 500000 1000000") and REPS
(default 5) change the run.
"""
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import BIN, start_farm, start_receiver, stop_farm

SIZES = [int(s) for s in os.environ.get("SIZES", "10000 100000 200000 500000 1000000").split()]
REPS = int(os.environ.get("REPS", "5"))
PORT = 13000
POLLS = 3
LAYOUTS = {
    "sequential": ["--layout", "sequential"],
    "all-families": ["--layout", "all-families"],
    "split": ["--split-at", "32768"],
}


def measure(ns, argv):
    """(wall s, cpu s, peak RSS MiB) of one command run in `ns`."""
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        started = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-o", rss.name, "-f", "%M", "nsenter",
                                 f"--net=/run/netns/{ns}", *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        if status != 0:
            sys.exit(f"{argv[0]} failed: {proc.stderr.read().decode()}")
        proc.stderr.close()
        return wall, usage.ru_utime + usage.ru_stime, int(rss.read().split()[-1]) / 1024


def xtcp_poll(ns, flags=(), polls=1, binary=None):
    """measure() of `polls` polls back to back with these extra flags (of
    `binary`, by default this tree's xtcp), and the records the receiver
    counted. No metrics endpoint (which turns the aggregates off too)
    unless the flags give one."""
    receiver = start_receiver(ns, PORT, "count")
    endpoint = [] if "--prom-listen" in flags else ["--no-prom"]
    result = measure(ns, [binary or f"{BIN}/xtcp", "--max-loops", str(polls), "--frequency", "1ms",
                          *endpoint, "--no-statsd", "--dest", f"udp:127.0.0.1:{PORT}", *flags])
    receiver.send_signal(signal.SIGTERM)
    _, err = receiver.communicate()
    words = err.split()
    return result, int(words[words.index("records") + 1])


def own_us(xtcp_cpu, all_families_cpu, sockets):
    """The exporter's own work per socket, us: its CPU less that of the
    dump it asks for, drained (one dump of both families)."""
    return (xtcp_cpu - all_families_cpu) / sockets * 1e6


def slab_kib():
    """The kernel's slab memory now (/proc/meminfo `Slab`), KiB."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Slab:"))


def one_size(target):
    before = slab_kib()
    # 2 sockets per connection, 2 families.
    farm, ns, sockets = start_farm("e2e", target // 4)
    kernel_mib = (slab_kib() - before) / 1024
    # Records the receiver did not get, per xtcp run.
    lost = []
    floor = f"{BIN}/xtcp-dump-floor"
    per_family = ["--dump-layout", "per-family"]
    # The metrics endpoint's listener is one more socket in each poll.
    prom = ["--prom-listen", "127.0.0.1:0"]

    def xtcp(flags, polls=1):
        def run():
            result, records = xtcp_poll(ns, flags, polls)
            listeners = polls if flags[:2] == prom else 0
            lost.append((sockets * polls + listeners) - records)
            return result
        return run

    commands = {
        "floor": lambda: measure(ns, [floor]),
        "ss": lambda: measure(ns, ["ss", "-tinmH"]),
        "xtcp": xtcp([]),
        "xtcp per-family": xtcp(per_family),
        "xtcp prom": xtcp([*prom, "--no-aggregates"]),
        "xtcp aggregates": xtcp(prom),
        **{name: (lambda args=args: measure(ns, [floor, *args])) for name, args in LAYOUTS.items()},
        # The same, POLLS times in one process: their difference is what a
        # poll of the running daemon costs, without the start.
        f"floor x{POLLS}": lambda: measure(ns, [floor, "--repeat", str(POLLS)]),
        f"all-families x{POLLS}": lambda: measure(
            ns, [floor, *LAYOUTS["all-families"], "--repeat", str(POLLS)]),
        f"xtcp x{POLLS}": xtcp([], POLLS),
        f"xtcp per-family x{POLLS}": xtcp(per_family, POLLS),
        f"xtcp prom x{POLLS}": xtcp([*prom, "--no-aggregates"], POLLS),
        f"xtcp aggregates x{POLLS}": xtcp(prom, POLLS),
    }
    runs = {name: [] for name in commands}
    try:
        baseline = [statistics.median(m) for m in zip(*(measure(ns, ["true"]) for _ in range(REPS)))]
        names = list(runs)
        for rep in range(REPS):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                runs[name].append(commands[name]())
    finally:
        stop_farm(farm)
    return sockets, baseline, runs, lost, kernel_mib


def main():
    print(f"{REPS} runs of each, rotated; medians. Machine: {os.cpu_count()} CPUs, "
          f"Linux {os.uname().release}\n")
    summary = []
    for target in SIZES:
        sockets, baseline, runs, lost, kernel_mib = one_size(target)
        med = {name: [statistics.median(r[i] for r in rs) for i in range(3)]
               for name, rs in runs.items()}
        print(f"### {sockets} sockets\n")
        print("| | wall ms | CPU ms | peak RSS MiB |")
        print("|---|---|---|---|")
        for name, (wall, cpu, rss) in [("launchers (`true`)", baseline), *med.items()]:
            name = f"floor, {name}" if name in LAYOUTS else name
            print(f"| {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {rss:.1f} |")
        print()
        summary.append((sockets, med, lost, kernel_mib, runs))
    print("One run (one poll, the start included):\n")
    print("| sockets | xtcp/floor wall | xtcp/floor CPU | ss/xtcp wall | xtcp CPU us/socket "
          "| own CPU us/socket | per-family/floor wall, CPU "
          "| xtcp peak RSS MiB | records lost (most of any run) "
          "| kernel memory of the farm MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sockets, med, lost, kernel_mib, _ in summary:
        x, f, s, p = med["xtcp"], med["floor"], med["ss"], med["xtcp per-family"]
        own = own_us(x[1], med["all-families"][1], sockets)
        print(f"| {sockets} | {x[0] / f[0]:.2f} | {x[1] / f[1]:.2f} | {s[0] / x[0]:.2f} "
              f"| {x[1] / sockets * 1e6:.2f} | {own:.2f} | {p[0] / f[0]:.2f}, {p[1] / f[1]:.2f} "
              f"| {x[2]:.1f} | {max(lost)} | {kernel_mib:.0f} |")
    print(f"\nA poll of the running daemon: ({POLLS} polls - 1 poll) / {POLLS - 1}, "
          "of the medians:\n")
    print("| sockets | floor wall, CPU ms | xtcp wall, CPU ms | xtcp/floor wall | xtcp/floor CPU "
          "| xtcp CPU us/socket | own CPU us/socket | per-family/floor wall, CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for sockets, med, _, _, _ in summary:
        def poll(name):
            many, one = med[f"{name} x{POLLS}"], med[name]
            return [(many[i] - one[i]) / (POLLS - 1) for i in range(2)]
        f, x, a, p = poll("floor"), poll("xtcp"), poll("all-families"), poll("xtcp per-family")
        own = own_us(x[1], a[1], sockets)
        print(f"| {sockets} | {f[0] * 1e3:.1f}, {f[1] * 1e3:.1f} | {x[0] * 1e3:.1f}, {x[1] * 1e3:.1f} "
              f"| {x[0] / f[0]:.2f} | {x[1] / f[1]:.2f} | {x[1] / sockets * 1e6:.2f} | {own:.2f} "
              f"| {p[0] / f[0]:.2f}, {p[1] / f[1]:.2f} |")
    print("\nThe per-service aggregates: the metrics endpoint on, the aggregates off and on; "
          "one run, and a poll of the running daemon as above; the paired ratio is the median "
          f"of each round's on/off CPU of the x{POLLS} runs, made one after the other:\n")
    print("| sockets | off: one run CPU ms | on: one run CPU ms | on/off | off: a poll CPU ms "
          "| on: a poll CPU ms | on/off | paired on/off | off peak RSS MiB | on peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sockets, med, _, _, runs in summary:
        off, on = med["xtcp prom"], med["xtcp aggregates"]
        def poll(name):
            return (med[f"{name} x{POLLS}"][1] - med[name][1]) / (POLLS - 1)
        p_off, p_on = poll("xtcp prom"), poll("xtcp aggregates")
        paired = statistics.median(
            a[1] / b[1] for a, b in zip(runs[f"xtcp aggregates x{POLLS}"], runs[f"xtcp prom x{POLLS}"]))
        print(f"| {sockets} | {off[1] * 1e3:.1f} | {on[1] * 1e3:.1f} | {on[1] / off[1]:.3f} "
              f"| {p_off * 1e3:.1f} | {p_on * 1e3:.1f} | {p_on / p_off:.3f} | {paired:.3f} "
              f"| {off[2]:.1f} | {on[2]:.1f} |")
    print("\nThe kernel's work laid out differently, against the floor (wall, CPU):\n")
    print("| sockets | " + " | ".join(LAYOUTS) + " | ss/sequential wall |")
    print("|---|" + "---|" * (len(LAYOUTS) + 1))
    for sockets, med, _, _, _ in summary:
        f = med["floor"]
        cells = [f"{med[n][0] / f[0]:.2f}, {med[n][1] / f[1]:.2f}" for n in LAYOUTS]
        ss_seq = med["ss"][0] / med["sequential"][0]
        print(f"| {sockets} | " + " | ".join(cells) + f" | {ss_seq:.2f} |")


if __name__ == "__main__":
    main()
