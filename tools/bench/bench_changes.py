#!/usr/bin/env python3
"""Change-only export benchmark: what a poll of an idle farm costs with
`--changes-only` against a full poll, side by side, and the memory of the
change tracker.

Run as root via `make bench-changes` (builds the release binaries first). A
socket farm holds SIZE sockets (default 100000) in a private namespace; for
each mode (full, `--changes-only`) xtcp runs one poll and three polls
(200 ms apart) into a counting receiver (`xtcp-debug-server --format
count`), REPS times in rotated order. A later poll's cost is (three polls -
one poll) / 2: CPU (user + sys), bytes and records the receiver got. The
tracker's memory is the difference of the peak RSS of the three-poll runs,
per socket. Prints Markdown tables of medians.
"""
import os
import signal
import statistics

from bench_e2e import measure
from benchlib import BIN, start_farm, start_receiver, stop_farm

SIZE = int(os.environ.get("SIZE", "100000"))
REPS = int(os.environ.get("REPS", "5"))
PORT = 13000
MODES = {"full": [], "--changes-only": ["--changes-only"]}


def run(ns, flags, polls):
    """measure() of `polls` polls and what the receiver counted."""
    receiver = start_receiver(ns, PORT, "count")
    wall, cpu, rss = measure(ns, [f"{BIN}/xtcp", "--max-loops", str(polls), "--frequency", "200ms",
                                  "--no-prom", "--no-statsd", "--dest", f"udp:127.0.0.1:{PORT}",
                                  *flags])
    receiver.send_signal(signal.SIGTERM)
    _, err = receiver.communicate()
    words = err.split()
    value = lambda key: int(words[words.index(key) + 1])
    return {"cpu": cpu, "rss": rss, "bytes": value("bytes"), "records": value("records")}


def main():
    farm, ns, sockets = start_farm("changes", SIZE // 4)
    runs = {(mode, polls): [] for mode in MODES for polls in (1, 3)}
    keys = list(runs)
    try:
        for rep in range(REPS):
            shift = rep % len(keys)
            for mode, polls in keys[shift:] + keys[:shift]:
                runs[(mode, polls)].append(run(ns, MODES[mode], polls))
    finally:
        stop_farm(farm)
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
    # A later poll, per repetition: (three polls - one poll) / 2 of that
    # repetition's runs, then the median.
    later = {
        mode: {m: statistics.median((three[m] - one[m]) / 2
                                    for one, three in zip(runs[(mode, 1)], runs[(mode, 3)]))
               for m in ("cpu", "bytes", "records")}
        for mode in MODES
    }
    print(f"{sockets} idle sockets, {REPS} runs of each, rotated; medians. "
          f"Machine: {os.cpu_count()} CPUs, Linux {os.uname().release}\n")
    print("| mode | first poll: records | later poll: CPU ms | later poll: records "
          "| later poll: bytes sent | peak RSS MiB (3 polls) |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        print(f"| {mode} | {med[(mode, 1)]['records']:.0f} | {later[mode]['cpu'] * 1e3:.1f} | "
              f"{later[mode]['records']:.0f} | {later[mode]['bytes']:.0f} | "
              f"{med[(mode, 3)]['rss']:.1f} |")
    full, changes = later["full"], later["--changes-only"]
    tracker = (med[("--changes-only", 3)]["rss"] - med[("full", 3)]["rss"]) * 2**20
    print(f"\nA later poll with --changes-only: {changes['cpu'] / full['cpu']:.2f}x the CPU and "
          f"{changes['bytes'] / max(full['bytes'], 1):.4f}x the bytes of a full one; the tracker "
          f"takes {tracker / sockets:.0f} bytes per socket ({tracker / 2**20:.1f} MiB).")

if __name__ == "__main__":
    main()
