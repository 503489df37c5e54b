#!/usr/bin/env python3
"""UDP batching benchmark: exporter and receiver CPU per poll, and records
lost, for several --udp-batch-bytes values, measured side by side; and what
signing each datagram (`--feed-key`) costs the exporter, per datagram.

Run as root via `make bench-udp` (builds the release binaries first). A
socket farm holds PAIRS connections per family in a private namespace; for
each repetition and each batch size (order rotated every repetition) a
counting receiver (`xtcp-debug-server --format none`) and `xtcp --max-loops
POLLS` run inside the namespace. CPU is user+sys from getrusage of each
child. Signed runs give both the exporter and the receiver the same key
file. Prints a Markdown table of medians.
"""
import os
import signal
import statistics
import subprocess
import sys
import tempfile

from benchlib import BIN, children_cpu, start_farm, start_receiver, stop_farm

PAIRS = int(os.environ.get("PAIRS", "4000"))
POLLS = int(os.environ.get("POLLS", "5"))
REPS = int(os.environ.get("REPS", "5"))
SIZES = [0, 1472, 8192, 16384, 32768, 65507]
DEFAULT = 65507
# (batch size, signed): every size plain, and the default and the smallest
# batches signed too.
RUNS = [(size, False) for size in SIZES] + [(1472, True), (DEFAULT, True)]
PORT = 13000


def one_run(ns, sockets, batch, key):
    signing = ["--feed-key", key] if key else []
    server = start_receiver(ns, PORT, extra=signing)
    before = children_cpu()
    xtcp = subprocess.run(
        ["ip", "netns", "exec", ns, f"{BIN}/xtcp", "--max-loops", str(POLLS),
         "--frequency", "200ms", "--udp-batch-bytes", str(batch), *signing,
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
    results = {run: [] for run in RUNS}
    key = tempfile.NamedTemporaryFile(prefix="xtcp-bench-key-")
    key.write(os.urandom(32).hex().encode())
    key.flush()
    try:
        for rep in range(REPS):
            order = RUNS[rep % len(RUNS):] + RUNS[:rep % len(RUNS)]
            for size, signed in order:
                results[(size, signed)].append(
                    one_run(ns, sockets, size, key.name if signed else None))
    finally:
        stop_farm(farm)
        key.close()
    med = lambda run, k: statistics.median(r[k] for r in results[run])
    print(f"{sockets} sockets, {POLLS} polls per run, {REPS} runs per size, medians per poll\n")
    print("| --udp-batch-bytes | --feed-key | datagrams/poll | exporter CPU ms/poll | "
          "receiver CPU ms/poll | records lost | signing, exporter us/datagram |")
    print("|---|---|---|---|---|---|---|")
    for size, signed in RUNS:
        run = (size, signed)
        cost = ""
        if signed:
            extra_ms = med(run, "exporter_ms") - med((size, False), "exporter_ms")
            cost = f"{extra_ms * 1e3 / med(run, 'datagrams'):.1f}"
        name = f"{size} (default)" if size == DEFAULT else str(size)
        print(f"| {name} | {'yes' if signed else 'no'} | {med(run, 'datagrams'):.0f} | "
              f"{med(run, 'exporter_ms'):.1f} | {med(run, 'receiver_ms'):.1f} | "
              f"{sum(r['lost'] for r in results[run])} | {cost} |")


if __name__ == "__main__":
    main()
