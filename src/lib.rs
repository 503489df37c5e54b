//! xtcp: TCP socket telemetry from netlink `sock_diag` to protobuf records.
//!
//! The modules, from the kernel's bytes outwards (`docs/architecture.md`
//! draws the threads):
//! - [`wire`]: I/O-free decoding of the kernel's bytes, and the requests.
//! - [`filter`]: the `--filter` language, compiled to the kernel's bytecode.
//! - [`proto`]: the generated record types (`proto/xtcp.proto`).
//! - [`export`]: decoded socket -> record, and the destinations records go to.
//! - [`counting`]: the dump counters, defined once for every place that
//!   shows them.
//! - [`metrics`]: Prometheus and statsd, and the HTTP endpoint.
//! - [`pipeline`]: the netlink sockets, the threads and the poll loop.
//! - [`config`]: command line -> validated configuration.
//! - [`shutdown`]: what the pipeline's threads are woken by at a stop or
//!   an abort (the program's stop itself, its signals, its stderr lines,
//!   its command-line rules and its metrics endpoint are `xtcp_service`'s,
//!   shared with the forwarder and the debug server).
//! - [`identity`]: the hostname and instance every record carries.
//! - [`attribution`]: whose connection a socket is, from its cgroup.
//! - [`aggregate`]: each poll's sockets summed by service and peer group,
//!   for Prometheus and OpenTelemetry.

pub mod aggregate;
pub mod attribution;
pub mod config;
pub mod counting;
pub mod export;
pub mod filter;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod shutdown;
pub mod wire;
