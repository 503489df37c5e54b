#!/usr/bin/env python3
"""The forwarder's CPU per record, into a real broker, at 100k-socket polls.

Run as root via `make bench-forwarder` (builds the release binaries first;
needs `tansu`, which `make test` installs). A socket farm holds PAIRS
connections per family (100k sockets by default) in a private namespace.
For each repetition, inside the namespace: a fresh `tansu` broker
(in-memory storage) with the topic made, `xtcp-forwarder` with its defaults
(lz4, 20 ms linger) and a 256 MiB receive buffer, then `xtcp --max-loops
POLLS --frequency 1s` into it. The forwarder's CPU is the sum of its
threads' run time (/proc/PID/task/*/schedstat, ns) from just before the
exporter starts to the scrape that shows every record the exporter sent
acknowledged by the broker: receiving, checking, producing, compressing and
delivering, everything. Then it is stopped, and its exit line must show
every record delivered, none dropped, malformed or lost.

Then, unless SPOOL=0, the disk spool: for each repetition a forwarder with
`--spool-dir` (a fresh directory under /var/tmp) and no broker receives the
same POLLS polls, every record spooled (the brokers are down from the
start, so each message goes straight to disk); its CPU per record in is
measured as above. It is stopped (SIGTERM) and a new one started on the
same spool: the time until it serves metrics (it reads and checks every
segment first). Then the broker starts and the spool drains: the time
from the first message replayed to the spool empty and every record
acknowledged (the drain), the time from the broker's start to then (its
start, the topic's creation and the forwarder's metadata request once a
second included), the CPU per record out, and the forwarder's peak resident
memory (VmHWM) while it opened and drained the spool. The exit lines must
show every record spooled, then every
record delivered, none dropped or lost, and the spool directory must be
empty.

BASE=DIR also measures the `xtcp-forwarder` in DIR (a release build of
another commit, say; several directories separated by `:`), with the same
exporter, broker and farm, the order rotated every repetition, so every
row comes from one run.
PERF=FILE records the last run of this tree's forwarder with `perf record
-g` into FILE. Prints a Markdown table of medians.
"""
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import BIN, RECV_BUFFER, start_farm, stop_farm, wait_udp_bound

PAIRS = int(os.environ.get("PAIRS", "25000"))
POLLS = int(os.environ.get("POLLS", "5"))
REPS = int(os.environ.get("REPS", "5"))
BASE = os.environ.get("BASE")
PERF = os.environ.get("PERF")
SPOOL = os.environ.get("SPOOL", "1") != "0"
BROKER = "127.0.0.1:9092"
PROM = "127.0.0.1:9001"
TOPIC = "xtcp"


def ns_run(ns, *args, **kw):
    return subprocess.run(["ip", "netns", "exec", ns, *args], **kw)


def start_broker(ns):
    url = f"tcp://{BROKER}"
    broker = subprocess.Popen(
        ["ip", "netns", "exec", ns, "tansu", "broker", "--listener-url", url,
         "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while ns_run(ns, "tansu", "topic", "create", "--broker", url, TOPIC,
                 capture_output=True).returncode != 0:
        if time.time() > deadline:
            sys.exit("tansu did not start")
        time.sleep(0.2)
    return broker


def cpu_ns(pid):
    """Run time of every thread of `pid`, in ns."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that just ended
    return total


def scrape(ns, name):
    body = ns_run(ns, "curl", "-sf", f"http://{PROM}/metrics",
                  capture_output=True, text=True).stdout
    m = re.search(rf"^{re.escape(name)} (\d+)$", body, re.M)
    return int(m.group(1)) if m else None


def peak_rss_mib(pid):
    """The process's peak resident memory (VmHWM), MiB."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    return kib / 1024


def first_time(ns, name):
    """When `name` first scrapes above 0 (checked every 10 ms)."""
    while not scrape(ns, name):
        time.sleep(0.01)
    return time.time()


def wait_scrape(ns, name, at_least, what, limit=300):
    deadline = time.time() + limit
    while (scrape(ns, name) or 0) < at_least:
        if time.time() > deadline:
            sys.exit(f"{what}: {name} below {at_least}")
        time.sleep(0.1)


def exit_value(line, name):
    words = line.split()
    return int(words[words.index(name) + 1])


def start_forwarder(ns, bindir, *extra):
    forwarder = subprocess.Popen(
        ["ip", "netns", "exec", ns, f"{bindir}/xtcp-forwarder", "--brokers", BROKER,
         "--topic", TOPIC, "--recv-buffer", str(RECV_BUFFER), *extra],
        stderr=subprocess.PIPE, text=True)
    wait_udp_bound(ns, 13000)
    while scrape(ns, "xtcp_forwarder_datagrams_total") is None:
        time.sleep(0.05)
    return forwarder


def export(ns):
    """POLLS polls of the farm into the forwarder; the records sent."""
    xtcp = ns_run(ns, f"{BIN}/xtcp", "--max-loops", str(POLLS), "--frequency", "1s",
                  "--no-prom", "--no-statsd", capture_output=True, text=True)
    if xtcp.returncode != 0:
        sys.exit(f"xtcp failed: {xtcp.stderr}")
    stopped = next(l for l in xtcp.stderr.splitlines() if l.startswith("xtcp: stopped:"))
    return exit_value(stopped.split(" | ")[1], "records")


def stop_forwarder(forwarder, sent):
    """SIGTERM; its exit line must show every record delivered."""
    forwarder.send_signal(signal.SIGTERM)
    _, err = forwarder.communicate()
    line = next(l for l in err.splitlines() if l.startswith("xtcp-forwarder: stopped:"))
    delivered = exit_value(line, "delivered_records")
    bad = {k: exit_value(line, k) for k in ("dropped_records", "lost")}
    if delivered != sent or any(bad.values()):
        sys.exit(f"not every record delivered: sent {sent}\n{line}")


def one_run(ns, bindir, perf):
    broker = start_broker(ns)
    forwarder = start_forwarder(ns, bindir)
    recorder = None
    if perf:
        recorder = subprocess.Popen(["perf", "record", "-g", "-q", "-o", perf,
                                     "-p", str(forwarder.pid)])
        time.sleep(1)
    before = cpu_ns(forwarder.pid)
    sent = export(ns)
    wait_scrape(ns, "xtcp_forwarder_delivered_records_total", sent, "the broker", 120)
    used = cpu_ns(forwarder.pid) - before
    if recorder:
        recorder.send_signal(signal.SIGINT)
        recorder.wait()
    stop_forwarder(forwarder, sent)
    broker.kill()
    broker.wait()
    return {"us_per_record": used / 1e3 / sent, "records_per_poll": sent / POLLS,
            "cpu_ms_per_poll": used / 1e6 / POLLS}


def spool_run(ns, bindir):
    """The brokers away while POLLS polls arrive, then back."""
    spool = tempfile.mkdtemp(prefix="xtcp-spool-bench-", dir="/var/tmp")
    try:
        forwarder = start_forwarder(ns, bindir, "--spool-dir", spool,
                                    "--spool-bytes", str(64 << 30))
        before = cpu_ns(forwarder.pid)
        sent = export(ns)
        wait_scrape(ns, 'xtcp_forwarder_spooled_records_total{reason="outage"}', sent,
                    "spooling")
        spooled = cpu_ns(forwarder.pid)
        size = scrape(ns, "xtcp_forwarder_spool_bytes")
        # A restart: the new forwarder reads the whole spool at its start.
        forwarder.send_signal(signal.SIGTERM)
        _, err = forwarder.communicate()
        line = next(l for l in err.splitlines() if l.startswith("xtcp-forwarder: stopped:"))
        if exit_value(line, "spooled_records") != sent:
            sys.exit(f"not every record spooled: sent {sent}\n{line}")
        restarting = time.time()
        forwarder = start_forwarder(ns, bindir, "--spool-dir", spool,
                                    "--spool-bytes", str(64 << 30))
        restart = time.time() - restarting
        replaying = cpu_ns(forwarder.pid)
        # The first replayed message is watched for while the broker starts.
        first = []
        watcher = threading.Thread(target=lambda: first.append(
            first_time(ns, "xtcp_forwarder_replayed_messages_total")))
        watcher.start()
        starting = time.time()
        broker = start_broker(ns)
        wait_scrape(ns, "xtcp_forwarder_delivered_records_total", sent, "draining")
        while scrape(ns, "xtcp_forwarder_spool_bytes"):
            time.sleep(0.01)
        done = time.time()
        watcher.join()
        drain = done - first[0]
        drained = cpu_ns(forwarder.pid) - replaying
        peak = peak_rss_mib(forwarder.pid)
        stop_forwarder(forwarder, sent)
        broker.kill()
        broker.wait()
        if os.listdir(spool):
            sys.exit(f"the spool is not empty: {os.listdir(spool)}")
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    return {"records": sent, "mib": size / 2**20,
            "us_in": (spooled - before) / 1e3 / sent,
            "us_out": drained / 1e3 / sent, "restart_s": restart,
            "drain_s": drain, "out_per_s": sent / drain, "peak_mib": peak,
            "back_s": done - starting}


def spool_table(ns, variants, names):
    results = {name: [] for name in names}
    for rep in range(REPS):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            results[name].append(spool_run(ns, variants[name]))
    med = lambda name, k: statistics.median(r[k] for r in results[name])
    print(f"\nThe spool: {POLLS} polls spooled with no broker, then drained into a "
          f"new one; {REPS} runs, medians; every record delivered in every run\n")
    print("| forwarder | records | spool MiB | in: us/record | in: records/s per core "
          "| restart s | drain s | out: records/s | out: us/record "
          "| broker start to empty s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {med(name, 'records'):.0f} | {med(name, 'mib'):.1f} | "
              f"{med(name, 'us_in'):.3f} | {1e6 / med(name, 'us_in'):,.0f} | "
              f"{med(name, 'restart_s'):.2f} | {med(name, 'drain_s'):.2f} | {med(name, 'out_per_s'):,.0f} | "
              f"{med(name, 'us_out'):.3f} | {med(name, 'back_s'):.2f} | "
              f"{med(name, 'peak_mib'):.0f} |")


def main():
    farm, ns, sockets = start_farm("fwdbench", PAIRS)
    variants = {"this tree": BIN}
    for dir in BASE.split(":") if BASE else []:
        variants[dir] = dir
    names = list(variants)
    results = {name: [] for name in names}
    try:
        for rep in range(REPS):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                perf = PERF if PERF and name == "this tree" and rep == REPS - 1 else None
                results[name].append(one_run(ns, variants[name], perf))
        print_table(results, names, sockets)
        if SPOOL:
            # Only this tree: other builds may have no spool.
            spool_table(ns, {"this tree": BIN}, ["this tree"])
    finally:
        stop_farm(farm)


def print_table(results, names, sockets):
    med = lambda name, k: statistics.median(r[k] for r in results[name])
    print(f"{sockets} sockets in the farm, {POLLS} polls per run, {REPS} runs per "
          f"forwarder, medians; every record delivered in every run\n")
    print("| forwarder | records/poll | forwarder CPU ms/poll | us/record | records/s per core |")
    print("|---|---|---|---|---|")
    for name in names:
        us = med(name, "us_per_record")
        print(f"| {name} | {med(name, 'records_per_poll'):.0f} | "
              f"{med(name, 'cpu_ms_per_poll'):.1f} | {us:.3f} | {1e6 / us:,.0f} |")
    for name in names[1:]:
        ratio = med(name, "us_per_record") / med("this tree", "us_per_record")
        print(f"\n{name} / this tree = {ratio:.2f}x")


if __name__ == "__main__":
    main()
