#!/usr/bin/env bash
# What `make test` needs beyond the Rust toolchain, installed only when
# missing (run as root: apt-get). A fresh Debian machine gets:
#   iproute2 (`ip netns`), util-linux (`setpriv`), procps (`sysctl`): the
#     namespace tests;
#   prometheus (`promtool check metrics`): the metrics test;
#   systemd (`systemd-analyze`, `systemd-socket-activate`), strace: the
#   units' checks and the forwarder's socket activation;
#   rustfmt, clippy: the lints;
#   cargo-fuzz: the fuzz smoke run (built from crates.io, ~1 min);
#   cargo-deb: `make deb`, which the package test builds and installs
#     (from crates.io, ~2 min), with dpkg-dev (dpkg-shlibdeps, for the
#     package's dependencies) and man-db (`man -w` finds the installed page);
#   tmux: the top view's test;
#   tansu: a Kafka-compatible broker for the forwarder's tests (in-memory
#     storage, the dynostore feature; ~10 minutes to build, once);
#   chdb: ClickHouse embedded, which proves the DDL of docs/kafka.md;
#   opentelemetry-proto: the official OTLP definitions the aggregates
#     test's receiver decodes the pushes with.
set -euo pipefail

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v sysctl >/dev/null || missing+=(procps)
command -v promtool >/dev/null || missing+=(prometheus)
{ command -v systemd-analyze && command -v systemd-socket-activate; } >/dev/null ||
    missing+=(systemd)
command -v strace >/dev/null || missing+=(strace)
command -v tmux >/dev/null || missing+=(tmux)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
command -v man >/dev/null || missing+=(man-db)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    # --no-install-recommends: promtool is all that is needed of prometheus.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# cargo install puts tools in ~/.cargo/bin; the Makefile puts it on the PATH.
rustup component add rustfmt clippy >/dev/null 2>&1 || true
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
command -v tansu >/dev/null || cargo install --locked tansu@0.6.0 --features dynostore
python3 -c 'import chdb' 2>/dev/null || python3 -m pip install --quiet chdb==4.4.0
python3 -c 'import opentelemetry.proto' 2>/dev/null ||
    python3 -m pip install --quiet opentelemetry-proto==1.45.2
