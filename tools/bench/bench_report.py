#!/usr/bin/env python3
"""Prints ns/socket (or per record) and ratios from the last
`cargo bench --bench decode` run.

Reads criterion's saved estimates (target/criterion/decode/<bench>/new/
estimates.json): the median time of one iteration, which decodes the whole
fixture buffer, divided by the sockets in it. Used by `make bench`.
"""
import json
import pathlib
import sys

SOCKETS = 528  # tests/fixtures/bench-dump.bin; benches/decode.rs asserts it
ROOT = pathlib.Path(__file__).resolve().parents[2] / "target" / "criterion" / "decode"
TARGETS = {"xtcp_decode": 60.0, "xtcp_decode_marshal": 250.0}


def median_ns(bench: str) -> float:
    path = ROOT / bench / "new" / "estimates.json"
    try:
        est = json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"no criterion results at {path}: run `cargo bench --bench decode` first")
    return est["median"]["point_estimate"] / SOCKETS


def main() -> None:
    ours = median_ns("xtcp_decode")
    marshal = median_ns("xtcp_decode_marshal")
    theirs = median_ns("netlink_packet_sock_diag")
    forward = median_ns("forwarder_to_delimited")
    check = median_ns("record_check")
    prost = median_ns("record_prost_decode")
    print(f"| bench | median ns/socket | target |")
    print(f"|---|---|---|")
    for name, ns in [("xtcp_decode", ours), ("xtcp_decode_marshal", marshal),
                     ("netlink_packet_sock_diag", theirs), ("forwarder_to_delimited", forward),
                     ("record_check", check), ("record_prost_decode", prost)]:
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target:.0f} {'ok' if ns <= target else 'MISSED'}"
        print(f"| {name} | {ns:.1f} | {verdict} |")
    print()
    print(f"netlink_packet_sock_diag / xtcp_decode = {theirs / ours:.1f}x (target >= 5x)")
    print(f"netlink_packet_sock_diag / xtcp_decode_marshal = {theirs / marshal:.2f}x")
    print(f"record_prost_decode / record_check = {prost / check:.1f}x")


if __name__ == "__main__":
    main()
