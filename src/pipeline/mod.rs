//! The exporter's threads and how they are wired.
//!
//! ```text
//! poller (1)  --request-->  netlink socket per dump (both families, or one each)
//! netlinkers (per dump)     recv into pooled buffers --bounded channel-->
//! inetdiagers (per dump)    sample, decode, encode, send --> destination
//! ```
//!
//! - [`sock_diag`]: the `NETLINK_SOCK_DIAG` socket and datagram scanning.
//! - [`poller`], [`netlinker`], [`inetdiager`]: the three stages.
//! - [`family`]: one family's sockets, buffers and current dump;
//!   [`dump`]: one dump in flight, shared by the stages.
//! - [`netns`]: the namespaces polled; [`pool`]: receive buffers;
//!   [`sample`]: `--sampling-modulus`.
//! - [`report`]: what is printed per poll and at exit; [`cgroup`]: the
//!   memory limit the buffers must fit; [`watermark`]: how far the run's
//!   records went, for the receivers.

pub mod cgroup;
pub mod changes;
pub mod closes;
pub mod dump;
pub mod dumpfile;
pub mod family;
pub mod inetdiager;
pub mod netlinker;
pub mod netns;
pub mod poller;
pub mod pool;
pub mod report;
pub mod sample;
pub mod sock_diag;
pub mod watermark;

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::bounded;

use std::time::Duration;

use crate::config::{Config, Family};
use crate::export::record::RecordEncoder;
use crate::export::sink::{Output, Sink};
use crate::identity::Identity;
use crate::metrics::statsd::Statsd;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::wire::TailLayout;
use changes::ChangeTracker;
use closes::{CloseState, Closer};
use dumpfile::Capture;
use family::FamilyState;
use inetdiager::{Inetdiager, RecordWriter};
use netns::Namespaces;
use poller::Poller;
use pool::BufferPool;
use report::{FirstOfEach, RunTotals};
use sample::Sampler;
use watermark::Watermarks;
use xtcp_feed::auth::FeedKey;
use xtcp_service::metrics::Health;
use xtcp_service::prom::{PromServer, PromThread};
use xtcp_service::shutdown::{spawn, SignalThread};

/// Why the exporter could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what}: {source}")]
    Setup { what: String, source: io::Error },
    #[error("{0}")]
    Aborted(String),
}

pub(crate) fn setup(what: impl Into<String>) -> impl FnOnce(io::Error) -> RunError {
    move |source| RunError::Setup {
        what: what.into(),
        source,
    }
}

/// Runs the pipeline until `--max-loops` polls are done or a signal stops
/// it, and returns what the polls did.
pub fn run(config: &Config, identity: &Identity) -> Result<RunTotals, RunError> {
    let shutdown = Shutdown::new().map_err(setup("creating the shutdown eventfd"))?;
    let signals = SignalThread::start(&shutdown).map_err(setup("installing signal handlers"))?;
    let result = run_with(config, identity, &Output::Configured, &shutdown);
    signals.close();
    result
}

/// [`run`] with records going to `output`, until `shutdown` stops it (a
/// program embedding the pipeline, such as `xtcp-top`, stops it itself):
/// opens what the threads need, runs them until the poller ends, joins them.
pub fn run_with(
    config: &Config,
    identity: &Identity,
    output: &Output,
    shutdown: &Shutdown,
) -> Result<RunTotals, RunError> {
    // Everything that can fail is opened before the first thread starts.
    cgroup::check_fits(config)
        .map_err(|e| setup("checking the memory limit")(io::Error::other(e)))?;
    let kernel = kernel_release();
    let tail = TailLayout::for_release(&kernel);
    let encoder = RecordEncoder::new(identity.clone());
    let pool_capacity = |f: &Family| netlinker::pool_capacity(config, f);
    let dumps = config.dumps();
    let metrics = Metrics::new(&dumps, pool_capacity, &kernel, identity)
        .map_err(|e| setup("registering metrics")(io::Error::other(e)))?;
    let metrics = Arc::new(metrics);
    let health = Arc::new(Health::new("poll completed"));
    let prom = config
        .prom
        .as_ref()
        .map(|p| {
            let (health, stale_after) = (Arc::clone(&health), stale_after(config));
            PromServer::bind(
                "xtcp exporter",
                p.listen,
                p.path.clone(),
                metrics.registry().clone(),
                Box::new(move || health.check(stale_after)),
            )
            .map_err(setup(format!(
                "serving metrics on --prom-listen {}",
                p.listen
            )))
        })
        .transpose()?;
    let statsd = config
        .statsd
        .map(|dst| {
            Statsd::connect(dst, metrics.table.statsd_errors.clone())
                .map_err(setup(format!("opening --statsd-dst {dst}")))
        })
        .transpose()?;
    let feed_key = config
        .feed_key
        .as_ref()
        .map(|path| FeedKey::open(path, "xtcp"))
        .transpose()
        .map_err(|e| setup("--feed-key")(io::Error::other(e)))?;
    let mut families = Vec::new();
    for &family in &dumps {
        let pool = BufferPool::new(pool_capacity(&family), config.recv_buffer_len());
        let state = FamilyState::new(family, pool, shutdown.release_fd())
            .map_err(setup("creating the netlinkers' epoll set"))?;
        let state = Arc::new(state);
        let sinks = (0..family.inetdiagers)
            .map(|_| Sink::for_output(output, config, feed_key.clone()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(setup("opening the destination"))?;
        families.push((state, sinks));
    }

    let states: Vec<Arc<FamilyState>> = families.iter().map(|(s, _)| Arc::clone(s)).collect();
    let closes = config
        .close_buffer
        .map(|buffer| {
            let state = CloseState::new(config.families.clone(), buffer, shutdown.release_fd())
                .map_err(setup("creating the closer's epoll set"))?;
            let sink = Sink::for_output(output, config, feed_key.clone())
                .map_err(setup("opening the destination"))?;
            Ok::<_, RunError>((Arc::new(state), sink))
        })
        .transpose()?;
    let mut namespaces = Namespaces::new(
        config.netns.clone(),
        config.netlink_timeout,
        closes.as_ref().map(|(state, _)| Arc::clone(state)),
    );
    let problems = namespaces.refresh(&states);
    // The exporter's own namespace must open; selected ones may come and
    // go, and each poll says which it missed.
    if let (true, Some(problem)) = (config.netns.is_own(), problems.first()) {
        return Err(RunError::Setup {
            what: "opening the netlink sock_diag socket".into(),
            source: io::Error::other(problem.clone()),
        });
    }
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut prom_thread = None;
    let mut closer = None;
    let close_state = closes.as_ref().map(|(state, _)| Arc::clone(state));
    let changes = config
        .snapshot_every
        .map(|n| Arc::new(ChangeTracker::new(n)));
    let sampler = Sampler::new(config.sampling_modulus);
    let capture = config
        .capture
        .as_deref()
        .map(Capture::create)
        .transpose()
        .map_err(setup("opening --capture"))?;
    let inetdiager = |sink| {
        let mut writer = RecordWriter::new(encoder.clone(), sink, sampler, tail);
        writer.changes = changes.clone();
        Inetdiager {
            writer,
            capture: capture.clone(),
        }
    };
    let spawned =
        spawn_workers(config, shutdown, families, &inetdiager, &mut workers).and_then(|()| {
            if let Some((state, sink)) = closes {
                let closer_thread = Closer {
                    state,
                    // Closes are exported as they come, changed or not.
                    writer: RecordWriter::new(encoder.clone(), sink, sampler, tail),
                    metrics: Arc::clone(&metrics),
                    said: FirstOfEach::new("xtcp: warning: close records"),
                };
                let sd = shutdown.clone();
                closer = Some(spawn("closer".into(), shutdown, move || {
                    closer_thread.run(&sd)
                })?);
            }
            if let Some(server) = prom {
                prom_thread = Some(spawn_prom(config, shutdown, server)?);
            }
            Ok(())
        });
    let watermarks = Watermarks::open(
        config,
        output,
        identity,
        feed_key.clone(),
        encoder.clone(),
        metrics.table.watermarks.clone(),
    )
    .map_err(setup("opening the destination"))?;
    let (report_tx, report_rx) = bounded(dumps.len());
    let poller = spawned.and_then(|()| {
        let poller = Poller {
            families: states,
            namespaces,
            closes: close_state,
            changes: changes.clone(),
            config: config.clone(),
            shutdown: shutdown.clone(),
            report_tx,
            report_rx,
            metrics,
            health,
            statsd,
            watermarks,
        };
        spawn("poller".into(), shutdown, move || poller.run())
    });
    let ended = match poller {
        Ok(poller) => poller.join().ok(),
        Err(e) => {
            shutdown.abort(format!("starting threads: {e}"));
            None
        }
    };
    // The poller released the netlinkers when it ended; their exit closes the
    // channels, and the inetdiagers drain them and exit.
    if let Some(prom) = prom_thread {
        prom.stop();
    }
    for worker in workers {
        // A panicked worker has already recorded the failure.
        let _ = worker.join();
    }
    // The release that ended the netlinkers ends the closer too.
    let close_totals = closer.and_then(|c| c.join().ok());
    if let Some(capture) = capture {
        if let Err(e) = capture.finish() {
            shutdown.abort(format!("writing --capture: {e}"));
        }
    }
    // Every record is out: the receivers may count what is still missing.
    let totals = ended.map(|(mut totals, watermarks)| {
        if let Some(mut w) = watermarks {
            w.send(totals.polls, true);
            (totals.watermarks, totals.watermark_errors) = (w.sent, w.failed);
        }
        totals
    });
    match (shutdown.failure(), totals) {
        (Some(reason), _) => Err(RunError::Aborted(reason)),
        (None, Some(mut totals)) => {
            totals.closes = close_totals;
            Ok(totals)
        }
        (None, None) => Err(RunError::Aborted("the poller stopped unexpectedly".into())),
    }
}

/// Starts each family's netlinkers and inetdiagers, connected by a bounded
/// channel. The channel closes when the last netlinker exits.
fn spawn_workers(
    config: &Config,
    shutdown: &Shutdown,
    families: Vec<(Arc<FamilyState>, Vec<Sink>)>,
    inetdiager: &dyn Fn(Sink) -> Inetdiager,
    workers: &mut Vec<JoinHandle<()>>,
) -> io::Result<()> {
    for (state, sinks) in families {
        let name = state.family.name();
        let (tx, rx) = bounded(netlinker::channel_batches(config));
        for i in 0..state.family.netlinkers {
            let (state, tx, sd) = (Arc::clone(&state), tx.clone(), shutdown.clone());
            workers.push(spawn(
                format!("netlinker-{name}-{i}"),
                shutdown,
                move || netlinker::run(&state, tx, &sd),
            )?);
        }
        for (i, sink) in sinks.into_iter().enumerate() {
            let inetdiager = inetdiager(sink);
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

/// Starts the metrics endpoint's thread. Says where it listens with `-v`,
/// or when `--prom-listen` asked for any free port (0).
fn spawn_prom(config: &Config, shutdown: &Shutdown, server: PromServer) -> io::Result<PromThread> {
    let any_port = config.prom.as_ref().is_some_and(|p| p.listen.port() == 0);
    if config.verbose || any_port {
        let addr = server.local_addr()?;
        xtcp_service::say!(
            "xtcp: metrics at http://{addr}{}, health at /healthz",
            server.path()
        );
    }
    server.spawn(shutdown)
}

/// How old the last poll may be before `/healthz` fails: two polling
/// periods and a netlink timeout, so one slow poll does not flap it.
fn stale_after(config: &Config) -> Duration {
    config.frequency * 2 + config.netlink_timeout
}

/// `uname -r`, which decides the tcp_info tail layout.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
