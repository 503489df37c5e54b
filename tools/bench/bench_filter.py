#!/usr/bin/env python3
"""What a kernel-side `--filter` saves: one poll of a socket farm with and
without a filter, and the kernel's floor (`xtcp-dump-floor`) likewise, run
side by side REPS times in rotated order inside the farm's namespace.

Run as root via `make bench-filter` (builds the release binaries first).
The farm's first worker holds its connections on listener port 20001, so
the default FILTER, `sport 20001 or dport 20001`, keeps that worker's
sockets (both ends of its connections and the listener) and leaves out the
rest: what excluding every service but one looks like. Measured like
`make bench-e2e` (tools/bench/bench_e2e.py): wall, CPU (user + system) and peak
RSS of each command; records counted by `xtcp-debug-server --format count`.

SIZE (sockets, default 100000), REPS (default 7) and FILTER change the run.
"""
import os
import statistics

from bench_e2e import measure, xtcp_poll
from benchlib import BIN, start_farm, stop_farm

SIZE = int(os.environ.get("SIZE", "100000"))
REPS = int(os.environ.get("REPS", "7"))
FILTER = os.environ.get("FILTER", "sport 20001 or dport 20001")


def main():
    farm, ns, sockets = start_farm("filter", SIZE // 4)
    floor = f"{BIN}/xtcp-dump-floor"
    commands = {
        "floor": lambda: (measure(ns, [floor]), None),
        "floor --filter": lambda: (measure(ns, [floor, "--filter", FILTER]), None),
        "xtcp": lambda: xtcp_poll(ns),
        "xtcp --filter": lambda: xtcp_poll(ns, ["--filter", FILTER]),
    }
    runs = {name: [] for name in commands}
    records = {name: set() for name in commands}
    names = list(commands)
    try:
        for rep in range(REPS):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                result, got = commands[name]()
                runs[name].append(result)
                records[name].add(got)
    finally:
        stop_farm(farm)
    print(f"{sockets} sockets, filter `{FILTER}`; {REPS} runs of each, rotated; medians. "
          f"Machine: {os.cpu_count()} CPUs, Linux {os.uname().release}\n")
    print("| | wall ms | CPU ms | peak RSS MiB | records |")
    print("|---|---|---|---|---|")
    med = {}
    for name, rs in runs.items():
        med[name] = [statistics.median(r[i] for r in rs) for i in range(3)]
        wall, cpu, rss = med[name]
        got = ", ".join(str(r) for r in sorted(records[name] - {None})) or "-"
        print(f"| {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {rss:.1f} | {got} |")
    print("\n| filtered / unfiltered | wall | CPU |")
    print("|---|---|---|")
    for what in ["floor", "xtcp"]:
        a, b = med[f"{what} --filter"], med[what]
        print(f"| {what} | {a[0] / b[0]:.2f} | {a[1] / b[1]:.2f} |")


if __name__ == "__main__":
    main()
