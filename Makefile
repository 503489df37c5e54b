# `make test` is what CI runs (`.ci/run`); `make check` is the part that
# needs neither root nor external tools.

CARGO ?= cargo
FUZZ_RUNS ?= 200000
FUZZ_MAX_LEN ?= 8192
# Tools `cargo install` puts here (cargo-fuzz, tansu) are run by name.
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run build build-shipped build-all install deb test test-deps check lint fuzz-smoke fuzz bench bench-udp bench-forwarder bench-closes bench-changes bench-netns-scan bench-e2e bench-filter bench-netns bench-owner soak footprint fixtures clean

PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
DESTDIR ?=

## run: the exporter polling this host every 5s into the debug server, which prints each socket; Ctrl-C stops both
run: build
	./tools/run.sh

# What `make run` runs.
build:
	$(CARGO) build --release --locked -p xtcp -p xtcp-debug-server

# Every shipped program (the forwarder adds librdkafka's C build).
build-shipped:
	$(CARGO) build --release --locked -p xtcp -p xtcp-debug-server -p xtcp-forwarder -p xtcp-top

# And the test kit's (socket farm, dump floor), for the benches.
build-all:
	$(CARGO) build --release --locked --workspace

## deb: target/debian/xtcp_VERSION_ARCH.deb: binaries, unit, drop-ins, env file (a conffile), docs, man pages, completions (cargo-deb)
deb: build-shipped
	rm -rf target/deb-root
	DESTDIR=target/deb-root PREFIX=/usr UNITDIR=/lib/systemd/system sh tools/install.sh >/dev/null
	$(CARGO) deb --no-build --locked -p xtcp --output target/debian/

## install: binaries, systemd unit, env file (kept if present), docs under PREFIX (see tools/install.sh)
install: build-shipped
	PREFIX=$(PREFIX) SYSCONFDIR=$(SYSCONFDIR) UNITDIR=$(UNITDIR) DESTDIR=$(DESTDIR) ./tools/install.sh

## test: installs what the tests need if missing (tools/test-deps.sh), then formatting, lints, every test and a short fuzz run; as root (the tests make network namespaces); a test that cannot run fails
test: test-deps lint
	$(CARGO) build --locked --workspace --bins
	XTCP_TEST_REQUIRE_ALL=1 $(CARGO) test --locked --workspace --all-targets
	$(MAKE) fuzz-smoke

test-deps:
	./tools/test-deps.sh

## check: formatting, lints, unit tests and the fixture tests: no root, no external tools, a few minutes
check: lint
	$(CARGO) test --locked --workspace --lib --bins
	$(CARGO) test --locked --test it -- encode:: fixtures:: malformed::

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## fuzz-smoke: each fuzz target for a fixed number of runs: decode (seeded with the fixtures) and datagram (the forwarder's parser)
fuzz-smoke: fuzz/corpus/decode
	mkdir -p fuzz/corpus/datagram
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run decode corpus/decode -- -runs=$(FUZZ_RUNS) -max_len=$(FUZZ_MAX_LEN)
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run datagram corpus/datagram -- -runs=$(FUZZ_RUNS) -max_len=$(FUZZ_MAX_LEN)

## fuzz: a fuzz target until stopped (FUZZ_TARGET=decode or datagram)
FUZZ_TARGET ?= decode
fuzz: fuzz/corpus/decode
	mkdir -p fuzz/corpus/$(FUZZ_TARGET)
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $(FUZZ_TARGET) corpus/$(FUZZ_TARGET) -- -max_len=$(FUZZ_MAX_LEN)

# Seeds: the small captures (a 4 KB dump reaches every attribute; the
# 270 KB bench dump would make each run ~1000x slower).
FUZZ_SEEDS = tests/fixtures/scenario-*.bin tests/fixtures/tcp_info-*.bin
fuzz/corpus/decode: $(FUZZ_SEEDS)
	mkdir -p $@ && cp $(FUZZ_SEEDS) $@/ && touch $@

## bench: criterion decode benches, then ns/socket and ratios
bench:
	$(CARGO) bench --locked --bench decode
	python3 tools/bench/bench_report.py

## bench-udp: exporter and receiver CPU per poll for each --udp-batch-bytes, and the cost of --feed-key per datagram (root; 16k sockets in a namespace)
bench-udp: build-all
	python3 tools/bench/bench_udp.py

## bench-forwarder: the forwarder's CPU per record into a tansu broker at 100k-socket polls, every record delivered; then into its disk spool with no broker, and the spool's drain when one starts (root, tansu; PAIRS, POLLS, REPS, BASE=DIR of another build side by side, PERF=FILE, SPOOL=0 to skip the spool)
bench-forwarder: build-all
	python3 tools/bench/bench_forwarder.py

## bench-closes: exporter CPU per 10k closes/s and close messages lost at 10k, 50k, 100k closes/s (root; RATES, SECONDS, REPS)
bench-closes: build-all
	python3 tools/bench/bench_closes.py

## bench-changes: a later poll of an idle farm with --changes-only against a full one, and the tracker's memory (root; SIZE, REPS)
bench-changes: build-all
	python3 tools/bench/bench_changes.py

## bench-netns-scan: what --all-netns pays per poll to walk /proc, with 1000 more processes (PROCESSES)
bench-netns-scan:
	$(CARGO) bench --locked --bench netns_scan

## bench-e2e: one xtcp poll against the kernel's floor and ss at 10k, 100k, 200k, 500k and 1M sockets, with the farm's kernel memory and the receiver's loss (root; SIZES, REPS)
bench-e2e: build-all
	python3 tools/bench/bench_e2e.py

## bench-filter: one poll and the kernel's floor with and without a kernel-side --filter (root; SIZE, REPS, FILTER)
bench-filter: build-all
	python3 tools/bench/bench_filter.py

## bench-netns: a poll of 200 namespaces (shared tables, own tables, empty) against the kernel's floor making the same dumps, with 1 and 2 netlinkers (root; NAMESPACES, PAIRS, POLLS, REPS, CASES)
bench-netns: build-all
	python3 tools/bench/bench_netns.py

## bench-owner: a poll of 100k sockets in a pod's container cgroup, another cgroup churning beside it: default, --no-cgroup-paths and --processes, CPU and bytes, and ss -tanpH (root; SIZE, CHURN, REPS)
bench-owner: build-all
	python3 tools/bench/bench_owner.py

## soak: 10 minutes of socket churn under a polling exporter, RSS/threads/descriptors sampled (root; SOAK_SECS; 30 s of it runs in make test)
soak:
	SOAK_SECS=$${SOAK_SECS:-600} $(CARGO) test --release --locked --test it -- soak:: --nocapture

## footprint: syscalls per poll, peak RSS, threads and descriptors of the exporter (root; 16k sockets in a namespace)
footprint: build-all
	python3 tools/bench/footprint.py

## fixtures: recapture tests/fixtures/ from this kernel (root)
fixtures:
	$(CARGO) run --locked -p xtcp-testkit --bin xtcp-capture-fixtures -- tests/fixtures

clean:
	$(CARGO) clean
	rm -rf fuzz/target fuzz/corpus fuzz/artifacts
