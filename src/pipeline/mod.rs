//! The exporter's threads and how they are wired.
//!
//! ```text
//! poller (1)  --request-->  netlink socket per dump (both families, or one each)
//! netlinkers (per dump)     recv into pooled buffers --bounded channel-->
//! inetdiagers (per dump)    sample, decode, encode, send --> destination
//! ```
//!
//! - [`sock_diag`]: the `NETLINK_SOCK_DIAG` socket and datagram scanning.
//! - [`run`]: a run top to bottom: open, start the threads, join them.
//! - [`poller`], [`netlinker`], [`inetdiager`]: the three stages;
//!   [`writer`]: socket messages to records at the destination, for the
//!   inetdiagers, the [`closes`] and [`replay`]; [`capture`]: `--capture`.
//! - [`family`]: one family's sockets, buffers and current dump;
//!   [`dump`]: one dump in flight, shared by the stages.
//! - [`netns`]: the namespaces polled; [`pool`]: receive buffers;
//!   [`sample`]: `--sampling-modulus`.
//! - [`report`]: what is printed per poll and at exit; [`cgroup`]: the
//!   memory limit the buffers must fit; [`watermark`]: how far the run's
//!   records went, for the receivers.

pub mod capture;
pub mod cgroup;
pub mod changes;
pub mod closes;
pub mod dump;
pub mod family;
pub mod inetdiager;
pub mod netlinker;
pub mod netns;
pub mod poller;
pub mod pool;
pub mod replay;
pub mod report;
pub mod run;
pub mod sample;
pub mod sock_diag;
pub mod watermark;
pub mod writer;

pub use run::{kernel_release, run, run_with, RunError};
