#!/usr/bin/env python3
"""Close records benchmark: the exporter's CPU per 10,000 closes a second,
and the close messages lost, at several rates of closing sockets.

Run as root via `make bench-closes` (builds the release binaries first). In a
private namespace, `xtcp --close-records` (polling once an hour, so only the
closer works) sends to a counting receiver (`xtcp-debug-server --format
count`; the one poll at start exports listeners only) while
`xtcp-close-churn` opens and closes connections at each RATE
(sockets destroyed per second, two per connection) for SECONDS. The
exporter's CPU is user+sys from /proc/PID/stat over the churn and the second
after it; its exit line gives the messages read and lost. Each rate runs
REPS times, rates rotated; medians. A rate the machine cannot reach is run
as fast as it goes: the table gives the rate achieved.
"""
import os
import signal
import statistics
import subprocess
import sys
import time

from benchlib import BIN, start_receiver

RATES = [int(r) for r in os.environ.get("RATES", "10000 50000 100000").split()]
SECONDS = int(os.environ.get("SECONDS", "5"))
REPS = int(os.environ.get("REPS", "3"))
PORT = 13000
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def joined(ns):
    """Whether a sock_diag socket of `ns` is in both TCP destroy groups."""
    table = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/netlink"],
                           capture_output=True, text=True, check=True).stdout
    return any(line.split()[1] == "4" and int(line.split()[3], 16) == 5
               for line in table.splitlines()[1:])


def one_run(ns, rate):
    receiver = start_receiver(ns, PORT, "count")
    exporter = subprocess.Popen(
        ["ip", "netns", "exec", ns, f"{BIN}/xtcp", "--close-records", "--frequency", "1h",
         # The one poll at start exports listeners only (none then), not the
         # TIME_WAIT sockets earlier runs left: the receiver counts closes.
         "--states", "listen",
         "--no-prom", "--no-statsd", "--dest", f"udp:127.0.0.1:{PORT}"],
        stderr=subprocess.PIPE, text=True)
    while not joined(ns):
        time.sleep(0.02)
    before = cpu_seconds(exporter.pid)
    churn = subprocess.run(
        ["ip", "netns", "exec", ns, f"{BIN}/xtcp-close-churn", "--rate", str(rate),
         "--seconds", str(SECONDS)],
        capture_output=True, text=True)
    if churn.returncode != 0:
        sys.exit(f"xtcp-close-churn failed: {churn.stderr}")
    time.sleep(1)
    cpu = cpu_seconds(exporter.pid) - before
    exporter.send_signal(signal.SIGTERM)
    _, err = exporter.communicate()
    receiver.send_signal(signal.SIGTERM)
    _, received = receiver.communicate()
    words = churn.stdout.split()
    closes, took = int(words[1]), float(words[3])
    section = err.split("| closes", 1)[1].split()
    value = lambda key: int(section[section.index(key) + 1])
    got = received.split()
    return {
        "achieved": closes / took,
        "cpu_ms_per_s": cpu * 1e3 / took,
        "closes": closes,
        "messages": value("messages"),
        "lost": value("lost"),
        "received": int(got[got.index("records") + 1]),
    }


def main():
    ns = f"xtcp-closes-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    results = {rate: [] for rate in RATES}
    try:
        for rep in range(REPS):
            order = RATES[rep % len(RATES):] + RATES[:rep % len(RATES)]
            for rate in order:
                results[rate].append(one_run(ns, rate))
                # Let TIME_WAIT sockets of this run expire before the next.
                time.sleep(1)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    print(f"{SECONDS} s of churn per run, {REPS} runs per rate, medians. "
          f"Machine: {os.cpu_count()} CPUs, Linux {os.uname().release}\n")
    print("| target closes/s | achieved closes/s | exporter CPU ms/s | CPU ms/s per 10k closes/s "
          "| lost % | closes made, read + lost, records received (each run) |")
    print("|---|---|---|---|---|---|")
    for rate in RATES:
        runs = results[rate]
        med = lambda k: statistics.median(r[k] for r in runs)
        per_10k = statistics.median(r["cpu_ms_per_s"] / (r["achieved"] / 1e4) for r in runs)
        lost = statistics.median(100 * r["lost"] / r["closes"] for r in runs)
        each = "; ".join(f"{r['closes']}, {r['messages'] + r['lost']}, {r['received']}"
                         for r in runs)
        print(f"| {rate} | {med('achieved'):.0f} | {med('cpu_ms_per_s'):.1f} | {per_10k:.1f} | "
              f"{lost:.2f} | {each} |")


if __name__ == "__main__":
    main()
