#!/usr/bin/env python3
"""What the exporter does to its host, per poll: system calls (strace -c),
peak memory, CPU, threads and the sockets and files it holds.

Run as root via `make footprint` (builds the release binaries first). A
socket farm holds PAIRS connections per family in a private namespace (2 x
(2 x PAIRS + 1) TCP sockets) with a counting receiver for the records. Then,
inside the namespace, with the service's default flags:

1. system calls: `strace -f -c` around `xtcp --max-loops N` for N = 1 and
   N = 1 + POLLS; the difference divided by POLLS is the cost of one poll
   without the start-up;
2. peak RSS and CPU: `xtcp --max-loops POLLS` without strace, from wait4;
3. threads and open files: a long-running xtcp after its first poll, read
   from /proc (sockets classified by the namespace's socket tables).

Prints Markdown tables.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

from benchlib import BIN, start_farm, start_receiver, stop_farm

PAIRS = int(os.environ.get("PAIRS", "4000"))
POLLS = int(os.environ.get("POLLS", "5"))
PORT = 13000
FLAGS = ["--dest", f"udp:127.0.0.1:{PORT}"]
BURST = ["--frequency", "200ms"]


def xtcp(ns, *args):
    return ["ip", "netns", "exec", ns, f"{BIN}/xtcp", *FLAGS, *args]


def syscalls(ns, polls):
    """{syscall: calls} of one run of `polls` polls under strace."""
    with tempfile.NamedTemporaryFile(mode="r", suffix=".strace") as out:
        cmd = ["ip", "netns", "exec", ns, "strace", "-f", "-c", "-o", out.name,
               f"{BIN}/xtcp", *FLAGS, *BURST, "--max-loops", str(polls)]
        subprocess.run(cmd, check=True, capture_output=True)
        counts = {}
        for line in out.read().splitlines():
            fields = line.split()
            # "% time seconds usecs/call calls [errors] syscall"
            if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
                counts[fields[-1]] = int(fields[3])
        return counts


def peak(ns):
    """(peak RSS KiB, CPU seconds) of one run of POLLS polls."""
    proc = subprocess.Popen(xtcp(ns, *BURST, "--max-loops", str(POLLS)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"xtcp exited {status}")
    return usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def socket_inodes(ns, table):
    """{inode: table} for one of the namespace's /proc/net tables."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/proc/net/{table}"],
                          capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()[1:]
    # The inode column: tcp/udp and netlink 10th field, unix 7th.
    column = {"tcp": 9, "tcp6": 9, "udp": 9, "udp6": 9, "netlink": 9, "unix": 6}[table]
    return {line.split()[column]: table for line in lines if len(line.split()) > column}


def holdings(ns):
    """(threads, {kind: count}) of a running exporter after its first poll."""
    proc = subprocess.Popen(xtcp(ns, "--frequency", "1h"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        # The metrics port is the namespace's: scrape from inside it.
        scrape = ("import urllib.request;"
                  "print(urllib.request.urlopen('http://127.0.0.1:9000/metrics').read().decode())")
        while True:
            body = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", scrape],
                                  capture_output=True, text=True).stdout
            if "\nxtcp_polls_total 1\n" in body:
                break
            if time.time() > deadline:
                sys.exit("no poll within 30 s")
            time.sleep(0.1)
        threads = len(os.listdir(f"/proc/{proc.pid}/task"))
        tables = {}
        for table in ["tcp", "tcp6", "udp", "udp6", "netlink", "unix"]:
            tables.update(socket_inodes(ns, table))
        kinds = {}
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m:
                kind = "socket " + tables.get(m.group(1), "other").rstrip("6")
            elif target.startswith("anon_inode:"):
                kind = target
            else:
                kind = "file or pipe"
            kinds[kind] = kinds.get(kind, 0) + 1
        return threads, kinds
    finally:
        proc.terminate()
        proc.wait()


def main():
    farm, ns, sockets = start_farm("footprint", PAIRS)
    receiver = start_receiver(ns, PORT)
    try:
        one = syscalls(ns, 1)
        more = syscalls(ns, 1 + POLLS)
        rss_kib, cpu = peak(ns)
        threads, kinds = holdings(ns)
    finally:
        receiver.terminate()
        receiver.wait()
        stop_farm(farm)
    print(f"{sockets} sockets in the namespace (+1: the exporter's metrics listener), "
          f"default flags, --frequency 200ms\n")
    print(f"System calls per poll (strace -f -c, runs of {1 + POLLS} and 1 polls, difference / {POLLS}):\n")
    print("| system call | per poll |")
    print("|---|---|")
    per_poll = {name: (more.get(name, 0) - one.get(name, 0)) / POLLS for name in more}
    for name, n in sorted(per_poll.items(), key=lambda kv: -kv[1]):
        if n >= 0.5:
            print(f"| {name} | {n:.0f} |")
    total = sum(per_poll.values())
    print(f"| **all** | **{total:.0f}** ({total / (sockets + 1):.3f} per socket) |\n")
    print(f"Peak RSS over {POLLS} polls: {rss_kib / 1024:.1f} MiB; CPU {cpu / POLLS * 1e3:.1f} ms per poll\n")
    print(f"Held after the first poll: {threads} threads\n")
    print("| descriptor | count |")
    print("|---|---|")
    for kind, n in sorted(kinds.items()):
        print(f"| {kind} | {n} |")


if __name__ == "__main__":
    main()
