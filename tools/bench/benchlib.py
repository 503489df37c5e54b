"""Shared by the benchmark scripts in tools/bench/: the release binaries, a socket
farm in a private namespace, and waiting for a UDP receiver to bind."""
import os
import resource
import subprocess
import sys
import time

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release")


def start_farm(tag, pairs):
    """Starts `xtcp-socket-farm`; returns (process, namespace, sockets).
    Closing the process's stdin deletes the namespace."""
    farm = subprocess.Popen([f"{BIN}/xtcp-socket-farm", "--netns", tag, "--pairs", str(pairs)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = farm.stdout.readline().split()
    if not ready or ready[0] != "ready":
        sys.exit("socket farm failed")
    return farm, ready[1], int(ready[2])


def stop_farm(farm):
    farm.stdin.close()
    farm.wait()


def wait_udp_bound(ns, port):
    """Waits until something in `ns` is bound to UDP `port`."""
    needle = f":{port:04X} "
    while True:
        udp = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/udp"],
                             capture_output=True, text=True, check=True).stdout
        if needle in udp:
            return
        time.sleep(0.02)


def children_cpu():
    """User + system seconds of every child waited for so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# The receiver's socket buffer: a poll of 200k sockets arrives as a ~74 MB
# burst, faster than a receiver that decodes every record can read it.
RECV_BUFFER = 256 << 20


def start_receiver(ns, port, fmt="none", extra=()):
    """A counting `xtcp-debug-server --format none` (or `fmt`, and `extra`
    flags) in `ns`, once bound."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, f"{BIN}/xtcp-debug-server", "--format", fmt,
         "--listen", f"127.0.0.1:{port}", "--recv-buffer", str(RECV_BUFFER), *extra],
        stderr=subprocess.PIPE, text=True)
    wait_udp_bound(ns, port)
    return server
