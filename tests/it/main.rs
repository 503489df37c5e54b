//! xtcp's integration tests: one binary, a module per area, sharing
//! `common` (`xtcp_testkit::harness`). Run with `cargo test --test it`, one
//! module with `cargo test --test it pipeline::`. The Kafka tests live with
//! the forwarder (`crates/forwarder/tests/kafka.rs`).
//!
//! Most tests need root (they make network namespaces) and some need
//! external tools (`ip`, `promtool`, `tansu`, ...): without them a test
//! says what it skips and why, and passes. `make test` sets
//! `XTCP_TEST_REQUIRE_ALL=1`, under which a missing need fails the test, so
//! CI runs everything or fails. Tests that run the exporter or make
//! namespaces take turns (`common::serial`), so their timings and socket
//! counts are their own.

use xtcp_testkit::harness as common;

mod aggregates;
mod bundle;
mod cgroups;
mod changes;
mod clickhouse;
mod closes;
mod deb;
mod encode;
mod faults;
mod filter;
mod fixtures;
mod lines;
mod loss;
mod malformed;
mod namespaces;
mod netns;
mod once;
mod pipeline;
mod replay;
mod soak;
mod systemd;
mod top;
