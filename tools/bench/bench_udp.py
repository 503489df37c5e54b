#!/usr/bin/env python3
"""UDP batching benchmark: exporter and receiver CPU per poll, and records
lost, for several --udp-batch-bytes values, measured side by side.

Run as root via `make bench-udp` (builds the release binaries first). A
socket farm holds PAIRS connections per family in a private namespace; for
each repetition and each batch size (order rotated every repetition) a
counting receiver (`xtcp-debug-server --format none`) and `xtcp --max-loops
POLLS` run inside the namespace. CPU is user+sys from getrusage of each
child. Prints a Markdown table of medians.
"""
import os
import signal
import statistics
import subprocess
import sys

from benchlib import BIN, children_cpu, start_farm, start_receiver, stop_farm

PAIRS = int(os.environ.get("PAIRS", "4000"))
POLLS = int(os.environ.get("POLLS", "5"))
REPS = int(os.environ.get("REPS", "5"))
SIZES = [0, 1472, 8192, 16384, 32768, 65507]
PORT = 13000


def one_run(ns, sockets, batch):
    server = start_receiver(ns, PORT)
    before = children_cpu()
    xtcp = subprocess.run(
        ["ip", "netns", "exec", ns, f"{BIN}/xtcp", "--max-loops", str(POLLS),
         "--frequency", "200ms", "--udp-batch-bytes", str(batch),
         # Its metrics listener would be a socket more than the farm's.
         "--no-prom"],
        capture_output=True, text=True)
    exporter_cpu = children_cpu() - before
    if xtcp.returncode != 0:
        sys.exit(f"xtcp failed: {xtcp.stderr}")
    before = children_cpu()
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate()
    receiver_cpu = children_cpu() - before
    words = err.split()
    received = int(words[words.index("records") + 1])
    datagrams = int(words[words.index("datagrams") + 1])
    return {
        "exporter_ms": exporter_cpu / POLLS * 1e3,
        "receiver_ms": receiver_cpu / POLLS * 1e3,
        "datagrams": datagrams / POLLS,
        "lost": POLLS * sockets - received,
    }


def main():
    farm, ns, sockets = start_farm("udpbench", PAIRS)
    results = {size: [] for size in SIZES}
    try:
        for rep in range(REPS):
            order = SIZES[rep % len(SIZES):] + SIZES[:rep % len(SIZES)]
            for size in order:
                results[size].append(one_run(ns, sockets, size))
    finally:
        stop_farm(farm)
    print(f"{sockets} sockets, {POLLS} polls per run, {REPS} runs per size, medians per poll\n")
    print("| --udp-batch-bytes | datagrams/poll | exporter CPU ms/poll | receiver CPU ms/poll | records lost |")
    print("|---|---|---|---|---|")
    for size in SIZES:
        runs = results[size]
        med = lambda k: statistics.median(r[k] for r in runs)
        print(f"| {size} | {med('datagrams'):.0f} | {med('exporter_ms'):.1f} | "
              f"{med('receiver_ms'):.1f} | {sum(r['lost'] for r in runs)} |")


if __name__ == "__main__":
    main()
