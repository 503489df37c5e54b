#!/usr/bin/env python3
"""A container host's poll: xtcp across many namespaces against the kernel's
floor making the same dumps, measured side by side.

Run as root via `make bench-netns` (builds the release binaries first).
Three hosts are made in turn by `xtcp-socket-farm --namespaces N`, one
process holding every namespace:

- shared: N namespaces of PAIRS connections per family (50 sockets each
          with the default 12: both ends and a listener per family), all
          in the host's one TCP table, which every dump walks whole;
- own:    the same, each namespace made with a table of its own
          (`--own-table 1024`, net.ipv4.tcp_child_ehash_entries);
- empty:  N namespaces without a TCP socket.

In each, REPS times and in rotated order, these run from inside the first
of the namespaces (`nsenter --net=`), each once for 1 poll and once for
POLLS polls back to back, so that (POLLS polls - 1 poll) / (POLLS - 1) is
what one poll of the running daemon costs, without the start (opening a
socket in every namespace):

- floor:  `xtcp-dump-floor --layout all-families --netns ...`, the dump
          xtcp asks for (one walk returning both families) made in every
          namespace in turn and only drained;
- xtcp:   `xtcp --netns ...` (one netlinker, the default), every record
          sent over UDP to a counting receiver;
- xtcp 2 netlinkers: the same with `--netlinkers4 2 --netlinkers6 2`, two
          namespaces dumped side by side.

CPU is user + system from wait4; wall is taken around the command. The
floor makes every dump, empty namespaces too; xtcp skips a namespace whose
sockstat counts say it has no TCP socket, so the empty host's line is its
own figure (the target is 40 ms per poll for 200 empty namespaces). Records
the receiver did not get (sockets x polls - records) are printed: they
must be 0.

NAMESPACES (default 200), PAIRS (default 12), POLLS (default 6), REPS
(default 5) and CASES (default "shared own empty") change the run; BASE=DIR
adds `DIR/xtcp` (another build, one netlinker) beside the others.
"""
import os
import statistics
import subprocess
import sys

from bench_e2e import measure, xtcp_poll
from benchlib import BIN

NAMESPACES = int(os.environ.get("NAMESPACES", "200"))
PAIRS = int(os.environ.get("PAIRS", "12"))
POLLS = int(os.environ.get("POLLS", "6"))
REPS = int(os.environ.get("REPS", "5"))
CASES = os.environ.get("CASES", "shared own empty").split()
BASE = os.environ.get("BASE")
FARM_FLAGS = {
    "shared": ["--pairs", str(PAIRS)],
    "own": ["--pairs", str(PAIRS), "--own-table", "1024"],
    "empty": ["--pairs", "0"],
}


def start_host(case):
    """`xtcp-socket-farm --namespaces`: (process, namespace names, sockets)."""
    farm = subprocess.Popen([f"{BIN}/xtcp-socket-farm", "--netns", f"host{case}",
                             "--namespaces", str(NAMESPACES), *FARM_FLAGS[case]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = farm.stdout.readline().split()
    if not ready or ready[0] != "ready":
        sys.exit("socket farm failed")
    return farm, ready[1].split(","), int(ready[2])


def one_case(case):
    farm, names, sockets = start_host(case)
    home = names[0]
    floor = [f"{BIN}/xtcp-dump-floor", "--layout", "all-families"]
    for name in names:
        floor += ["--netns", name]
    netns = ["--netns", ",".join(names)]
    lost = []

    def xtcp(flags, polls, binary=None):
        def run():
            result, records = xtcp_poll(home, [*netns, *flags], polls, binary)
            lost.append(sockets * polls - records)
            return result
        return run

    programs = {
        "floor": lambda polls: lambda: measure(home, [*floor, "--repeat", str(polls)]),
        "xtcp": lambda polls: xtcp([], polls),
        "xtcp, 2 netlinkers": lambda polls: xtcp(
            ["--netlinkers4", "2", "--netlinkers6", "2"], polls),
    }
    if BASE:
        programs["base xtcp"] = lambda polls: xtcp([], polls, f"{BASE}/xtcp")
    commands = {(name, polls): make(polls) for name, make in programs.items()
                for polls in [1, POLLS]}
    runs = {key: [] for key in commands}
    keys = list(commands)
    try:
        for rep in range(REPS):
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                runs[key].append(commands[key]())
    finally:
        farm.stdin.close()
        farm.wait()
    med = {key: [statistics.median(r[i] for r in rs) for i in range(2)] for key, rs in runs.items()}
    per_poll = {name: [(med[(name, POLLS)][i] - med[(name, 1)][i]) / (POLLS - 1) for i in range(2)]
                for name in programs}
    return sockets, per_poll, max(lost)


def main():
    print(f"{NAMESPACES} namespaces; {REPS} runs of each, rotated; medians; a poll is "
          f"({POLLS} polls - 1 poll) / {POLLS - 1}. Machine: {os.cpu_count()} CPUs, "
          f"Linux {os.uname().release}\n")
    print("| host | sockets | program | wall ms | CPU ms | CPU / floor's | CPU ms per namespace "
          "| records lost (most of any run) |")
    print("|---|---|---|---|---|---|---|---|")
    for case in CASES:
        sockets, per_poll, lost = one_case(case)
        floor_cpu = per_poll["floor"][1]
        for name, (wall, cpu) in per_poll.items():
            got = "-" if name == "floor" else lost
            print(f"| {case} | {sockets} | {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} "
                  f"| {cpu / floor_cpu:.2f} | {cpu / NAMESPACES * 1e3:.2f} | {got} |", flush=True)


if __name__ == "__main__":
    main()
