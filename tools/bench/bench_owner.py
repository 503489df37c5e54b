#!/usr/bin/env python3
"""What naming a connection's owner costs: one poll of SIZE sockets, all in
one container's cgroup, with the cgroup path and owner fields (the default),
without (`--no-cgroup-paths`), and with the processes too (`--processes`),
side by side, while another cgroup churns connections; and `ss -tanpH`,
which names the processes by reading every descriptor.

Run as root via `make bench-owner` (builds the release binaries first). It
makes a cgroup under the host's cgroup2 root (found in /proc/self/mountinfo)
laid out as the kubelet and containerd make a pod's container:

    /xtcp-bench.slice/kubepods-burstable-pod<UID>.slice/cri-containerd-<ID>.scope

starts `xtcp-socket-farm` inside it (its workers follow, so every socket
belongs to that cgroup) and `xtcp-close-churn --rate CHURN` in a second
cgroup beside it (connections opened and closed all along: new sockets, on
reused descriptor numbers, in most polls), and runs, REPS times in rotated
order, inside the farm's namespace (`nsenter --net=`, which keeps the
cgroup2 mount): `xtcp --max-loops 1` and `--max-loops 3` into a counting
receiver, in each mode; and `ss -tanpH`. (3 polls - 1 poll) / 2 is one poll
of the running daemon; the exporter's exit line gives the bytes it sent. The
farm, the churn and the cgroups are removed at the end.

SIZE (sockets, default 100000), CHURN (closed sockets a second, default
2000) and REPS (default 5) change the run.
"""
import os
import signal
import statistics
import subprocess
import sys
import time

from benchlib import BIN, start_receiver

SIZE = int(os.environ.get("SIZE", "100000"))
REPS = int(os.environ.get("REPS", "5"))
CHURN = int(os.environ.get("CHURN", "2000"))
PORT = 13000
POLLS = 3
POD = "0a1b2c3d_4e5f_6071_8293_a4b5c6d7e8f9"
CONTAINER = "5f3c" * 16


def cgroup2_root():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount, fs = line.split(" - ", 1)
            fields = mount.split()
            if fs.split()[0] == "cgroup2" and fields[3] == "/":
                return fields[4]
    sys.exit("no cgroup2 mount")


def run(ns, flags, polls):
    """(cpu s, bytes sent, records received) of `polls` polls."""
    receiver = start_receiver(ns, PORT, "count")
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", f"{BIN}/xtcp", "--max-loops", str(polls),
         "--frequency", "1ms", "--no-prom", "--no-statsd", "--dest", f"udp:127.0.0.1:{PORT}",
         *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"xtcp failed: {err}")
    receiver.send_signal(signal.SIGTERM)
    _, received = receiver.communicate()
    words = received.split()
    records = int(words[words.index("records") + 1])
    exit_line = next(l for l in err.splitlines() if l.startswith("xtcp: stopped"))
    words = exit_line.split()
    sent = sum(int(words[i + 1]) for i, w in enumerate(words) if w == "sent_bytes")
    return usage.ru_utime + usage.ru_stime, sent, records


def in_cgroup(path):
    """A preexec_fn moving the child into the cgroup at `path`."""
    def move():
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")
    return move


def ss_cpu(ns):
    """CPU s of `ss -tanpH` in `ns`."""
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "ss", "-tanpH"],
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit("ss failed")
    return usage.ru_utime + usage.ru_stime


def main():
    root = cgroup2_root()
    slice_dir = os.path.join(root, "xtcp-bench.slice")
    leaf = os.path.join(slice_dir, f"kubepods-burstable-pod{POD}.slice",
                        f"cri-containerd-{CONTAINER}.scope")
    churn_dir = os.path.join(slice_dir, "churn.service")
    os.makedirs(leaf)
    os.makedirs(churn_dir)
    farm = subprocess.Popen([f"{BIN}/xtcp-socket-farm", "--netns", "owner", "--pairs",
                             str(SIZE // 4)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=in_cgroup(leaf))
    ready = farm.stdout.readline().split()
    if not ready or ready[0] != "ready":
        sys.exit("socket farm failed")
    ns, sockets = ready[1], int(ready[2])
    churn = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", f"{BIN}/xtcp-close-churn",
                              "--rate", str(CHURN), "--seconds", "100000"],
                             stdout=subprocess.DEVNULL, preexec_fn=in_cgroup(churn_dir))
    modes = {"with owner (default)": [], "--no-cgroup-paths": ["--no-cgroup-paths"],
             "--processes": ["--processes"]}
    keys = [(mode, polls) for mode in modes for polls in [1, POLLS]]
    runs = {key: [] for key in keys}
    ss = []
    try:
        for rep in range(REPS):
            shift = rep % len(keys)
            for mode, polls in keys[shift:] + keys[:shift]:
                cpu, sent, records = run(ns, modes[mode], polls)
                # The churn's sockets come and go: at least the farm's.
                if records < sockets * polls:
                    sys.exit(f"{mode}: {records} records of {sockets * polls}")
                runs[(mode, polls)].append((cpu, sent / polls))
            ss.append(ss_cpu(ns))
    finally:
        churn.terminate()
        churn.wait()
        farm.stdin.close()
        farm.wait()
        for d in [leaf, os.path.dirname(leaf), churn_dir, slice_dir]:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.05)
    print(f"{sockets} sockets in `{leaf[len(root):]}`, {CHURN} closes/s beside them; "
          f"{REPS} runs of each, rotated; "
          f"medians; a poll is ({POLLS} polls - 1 poll) / {POLLS - 1}. "
          f"Machine: {os.cpu_count()} CPUs, Linux {os.uname().release}\n")
    print("| | CPU ms per poll | CPU us per socket | bytes sent per poll | bytes per record |")
    print("|---|---|---|---|---|")
    per_poll = {}
    for mode in modes:
        one = statistics.median(c for c, _ in runs[(mode, 1)])
        many = statistics.median(c for c, _ in runs[(mode, POLLS)])
        cpu = (many - one) / (POLLS - 1)
        sent = statistics.median(s for _, s in runs[(mode, POLLS)])
        per_poll[mode] = (cpu, sent)
        print(f"| {mode} | {cpu * 1e3:.1f} | {cpu / sockets * 1e6:.3f} | {sent:.0f} "
              f"| {sent / sockets:.1f} |")
    (a, sa), (b, sb), (p, sp) = per_poll.values()
    print(f"\nWith owner / without: CPU {a / b:.2f}, bytes {sa / sb:.2f}; "
          f"--processes / with owner: CPU {p / a:.2f}, bytes {sp / sa:.2f}; "
          f"ss -tanpH: CPU {statistics.median(ss) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
