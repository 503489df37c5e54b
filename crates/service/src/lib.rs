//! What every xtcp program (the exporter, the forwarder, the debug server)
//! does the same way, so that each does it once:
//! - [`say`]: stderr lines, each in one write;
//! - [`cli`]: command-line errors in one line, `--help`, `--man`,
//!   durations and ranges;
//! - [`shutdown`]: a stop on the first SIGINT/SIGTERM, an abort on the
//!   second or on a thread's panic;
//! - [`counters`]: counters declared as tables, each entry reaching its
//!   metric, the exit line, a warning and the docs check;
//! - [`metrics`]: the other metrics declared as tables, checked against the docs, and
//!   `/healthz`'s view; [`prom`]: the HTTP endpoint serving them.
//!
//! It links neither netlink nor the feed: the forwarder builds on it without
//! the exporter.

pub mod cli;
pub mod counters;
pub mod metrics;
pub mod prom;
pub mod say;
pub mod shutdown;
