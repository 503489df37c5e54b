//! The exporter's threads and how they are wired.
//!
//! ```text
//! poller (1)  --request-->  netlink socket per family
//! netlinkers (per family)   recv into pooled buffers --bounded channel-->
//! inetdiagers (per family)  sample, decode, encode, send --> destination
//! ```
//!
//! - [`netlink`]: the `NETLINK_SOCK_DIAG` socket and datagram scanning.
//! - [`poller`], [`netlinker`], [`inetdiager`]: the three stages.
//! - [`dump`]: one family's dump, shared by the stages, and its counters.
//! - [`pool`]: receive buffers; [`sample`]: `--sampling-modulus`.
//! - [`shutdown`]: signals, stop/abort, named threads; [`report`]: what is
//!   printed per poll and at exit.

pub mod dump;
pub mod inetdiager;
pub mod netlink;
pub mod netlinker;
pub mod poller;
pub mod pool;
pub mod report;
pub mod sample;
pub mod shutdown;

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::bounded;

use crate::config::Config;
use crate::export::record::RecordEncoder;
use crate::export::sink::Sink;
use crate::wire::TailLayout;
use dump::FamilyState;
use inetdiager::Inetdiager;
use netlink::SockDiagSocket;
use poller::Poller;
use pool::BufferPool;
use report::RunTotals;
use sample::Sampler;
use shutdown::{spawn, Shutdown, SignalThread};

/// Why the exporter could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
    #[error("{0}")]
    Aborted(String),
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> RunError {
    move |source| RunError::Setup { what, source }
}

/// Runs the pipeline until `--max-loops` polls are done or a signal stops
/// it, and returns what the polls did.
pub fn run(config: &Config) -> Result<RunTotals, RunError> {
    let shutdown = Shutdown::new().map_err(setup("creating the shutdown eventfd"))?;
    let signals = SignalThread::start(&shutdown).map_err(setup("installing signal handlers"))?;
    let result = run_threads(config, &shutdown);
    signals.close();
    result
}

/// Opens what the threads need, runs them until the poller ends, joins them.
fn run_threads(config: &Config, shutdown: &Shutdown) -> Result<RunTotals, RunError> {
    // Everything that can fail is opened before the first thread starts.
    let tail = TailLayout::for_release(&kernel_release());
    let encoder = RecordEncoder::new(hostname());
    let mut families = Vec::new();
    for &family in &config.families {
        let socket = SockDiagSocket::open(config.netlink_timeout)
            .map_err(setup("opening the netlink sock_diag socket"))?;
        // Each netlinker holds at most one buffer, the channel holds
        // `channel_size`, each inetdiager works on one: a netlinker waits on
        // the channel, never on the pool.
        let buffers = config.channel_size + family.netlinkers + family.inetdiagers;
        let state = Arc::new(FamilyState {
            family,
            socket,
            pool: BufferPool::new(buffers, config.recv_buffer_len()),
            current: Mutex::new(None),
            stale_datagrams: AtomicU64::new(0),
        });
        let sinks = (0..family.inetdiagers)
            .map(|_| Sink::open(config.dest, config.udp_batch_bytes))
            .collect::<io::Result<Vec<_>>>()
            .map_err(setup("opening the destination"))?;
        families.push((state, sinks));
    }

    let states: Vec<Arc<FamilyState>> = families.iter().map(|(s, _)| Arc::clone(s)).collect();
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let spawned = spawn_workers(config, shutdown, families, encoder, tail, &mut workers);
    let (report_tx, report_rx) = bounded(config.families.len());
    let poller = spawned.and_then(|()| {
        let poller = Poller {
            families: states,
            config: config.clone(),
            shutdown: shutdown.clone(),
            report_tx,
            report_rx,
        };
        spawn("poller".into(), shutdown, move || poller.run())
    });
    let totals = match poller {
        Ok(poller) => poller.join().ok(),
        Err(e) => {
            shutdown.abort(format!("starting threads: {e}"));
            None
        }
    };
    // The poller released the netlinkers when it ended; their exit closes the
    // channels, and the inetdiagers drain them and exit.
    for worker in workers {
        // A panicked worker has already recorded the failure.
        let _ = worker.join();
    }
    match (shutdown.failure(), totals) {
        (Some(reason), _) => Err(RunError::Aborted(reason)),
        (None, Some(totals)) => Ok(totals),
        (None, None) => Err(RunError::Aborted("the poller stopped unexpectedly".into())),
    }
}

/// Starts each family's netlinkers and inetdiagers, connected by a bounded
/// channel. The channel closes when the last netlinker exits.
fn spawn_workers(
    config: &Config,
    shutdown: &Shutdown,
    families: Vec<(Arc<FamilyState>, Vec<Sink>)>,
    encoder: RecordEncoder,
    tail: TailLayout,
    workers: &mut Vec<JoinHandle<()>>,
) -> io::Result<()> {
    let sampler = Sampler::new(config.sampling_modulus);
    for (state, sinks) in families {
        let name = state.family.name();
        let (tx, rx) = bounded(config.channel_size);
        for i in 0..state.family.netlinkers {
            let (state, tx, sd) = (Arc::clone(&state), tx.clone(), shutdown.clone());
            workers.push(spawn(
                format!("netlinker-{name}-{i}"),
                shutdown,
                move || netlinker::run(&state, tx, &sd),
            )?);
        }
        for (i, sink) in sinks.into_iter().enumerate() {
            let inetdiager = Inetdiager {
                encoder: encoder.clone(),
                sink,
                sampler,
                tail,
            };
            let (rx, sd) = (rx.clone(), shutdown.clone());
            workers.push(spawn(
                format!("inetdiager-{name}-{i}"),
                shutdown,
                move || inetdiager.run(rx, &sd),
            )?);
        }
    }
    Ok(())
}

/// `uname -r`, which decides the tcp_info tail layout.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}
