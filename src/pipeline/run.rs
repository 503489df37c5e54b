//! A run of the pipeline, top to bottom: [`Opened::open`] opens everything
//! a run needs (nothing can fail after it), [`Opened::start`] starts the
//! threads, [`Running::join`] waits for the poller to end and joins the
//! rest, and says what the polls did.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::aggregate::otlp::{OtlpConfig, OtlpMetrics, PushHandle, Pusher};
use crate::aggregate::prom::AggregateCollector;
use crate::aggregate::{ephemeral_ports, Aggregates};
use crate::attribution::processes::{ProcessMetrics, ProcessTable};
use crate::attribution::{find_cgroup2_root, CgroupCache, CgroupMetrics};
use crate::config::{Config, Family};
use crate::counting::CloseTotals;
use crate::export::record::RecordEncoder;
use crate::export::sink::{Output, Sink};
use crate::identity::Identity;
use crate::metrics::statsd::Statsd;
use crate::metrics::Metrics;
use crate::pipeline::capture::Capture;
use crate::pipeline::cgroup;
use crate::pipeline::changes::ChangeTracker;
use crate::pipeline::closes::{CloseState, Closer};
use crate::pipeline::family::FamilyState;
use crate::pipeline::inetdiager::Inetdiager;
use crate::pipeline::netlinker;
use crate::pipeline::netns::Namespaces;
use crate::pipeline::poller::{Poller, Reporting, Targets};
use crate::pipeline::pool::BufferPool;
use crate::pipeline::report::{FirstOfEach, RunTotals};
use crate::pipeline::sample::Sampler;
use crate::pipeline::watermark::Watermarks;
use crate::pipeline::writer::RecordWriter;
use crate::shutdown::Shutdown;
use crate::wire::TailLayout;
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
/// program embedding the pipeline, such as `xtcp-top`, stops it itself).
pub fn run_with(
    config: &Config,
    identity: &Identity,
    output: &Output,
    shutdown: &Shutdown,
) -> Result<RunTotals, RunError> {
    let opened = Opened::open(config, identity, output, shutdown)?;
    opened.start(config, shutdown).join(shutdown)
}

/// Makes the record writers of a run: every one numbers records from the
/// same encoder.
#[derive(Clone)]
struct Writers {
    encoder: RecordEncoder,
    sampler: Sampler,
    tail: TailLayout,
    /// With `--changes-only`, for the inetdiagers' writers.
    changes: Option<Arc<ChangeTracker>>,
    /// Every writer adds to them.
    aggregates: Option<Arc<Aggregates>>,
}

impl Writers {
    /// The writer of an inetdiager: exports what changed with
    /// `--changes-only`.
    fn for_polls(&self, sink: Sink) -> RecordWriter {
        let mut writer = self.for_closes(sink);
        writer.changes = self.changes.clone();
        writer
    }

    /// The writer of the closer: closes are exported as they come, changed
    /// or not.
    fn for_closes(&self, sink: Sink) -> RecordWriter {
        let mut writer = RecordWriter::new(self.encoder.clone(), sink, self.sampler, self.tail);
        writer.aggregate = self.aggregates.as_ref().map(Aggregates::accumulator);
        writer
    }
}

/// The map of the cgroup tree records' paths come from, walked once now;
/// `None`, said once, on a host without cgroup2.
fn open_cgroups(config: &Config, metrics: &Metrics) -> Option<Arc<CgroupCache>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(root) = find_cgroup2_root(&mountinfo) else {
        xtcp_service::say!(
            "xtcp: warning: no cgroup2 file system is mounted: records carry no cgroup path \
             (--no-cgroup-paths leaves them out without this warning)"
        );
        return None;
    };
    let t = &metrics.table;
    let cgroup_metrics = CgroupMetrics {
        known: t.cgroups_known.clone(),
        left_out: t.cgroups_left_out.clone(),
        walks: t.cgroup_walks.clone(),
        misses: t.cgroup_misses.clone(),
    };
    let c = config.cgroups;
    let cache = CgroupCache::new(root, c.cache, c.rescan, cgroup_metrics);
    if t.cgroups_known.get() == 0 {
        xtcp_service::say!(
            "xtcp: warning: the cgroup2 tree at {} cannot be read: records carry no cgroup \
             path (--no-cgroup-paths leaves them out without this warning)",
            cache.root().display()
        );
        return None;
    }
    if config.verbose {
        xtcp_service::say!(
            "xtcp: cgroup paths from {}: {} cgroups",
            cache.root().display(),
            t.cgroups_known.get()
        );
    }
    Some(Arc::new(cache))
}

/// The per-service aggregates, their series on the metrics registry.
fn open_aggregates(
    config: &Config,
    metrics: &Metrics,
    cgroups: Option<&Arc<CgroupCache>>,
) -> Result<Option<Arc<Aggregates>>, RunError> {
    let a = &config.aggregation;
    if !a.enabled {
        return Ok(None);
    }
    let aggregates = Arc::new(Aggregates::new(
        &a.groups,
        ephemeral_ports(),
        cgroups.map(|c| c.view()),
    ));
    AggregateCollector::new(Arc::clone(&aggregates))
        .and_then(|c| metrics.registry().register(Box::new(c)))
        .map_err(|e| setup("registering the aggregates' metrics")(io::Error::other(e)))?;
    Ok(Some(aggregates))
}

/// With `--otlp-url`: the thread that pushes the aggregates, and the
/// poller's handle to wake it. Its outcomes' series exist from the start.
fn open_otlp(
    config: &Config,
    aggregates: &Arc<Aggregates>,
    identity: &Identity,
    metrics: &Metrics,
) -> Option<(Pusher, PushHandle)> {
    let url = config.aggregation.otlp_url.clone()?;
    let t = &metrics.table;
    for result in ["delivered", "failed"] {
        t.otlp_exports.with_label_values(&[result]);
    }
    let otlp = OtlpConfig {
        url,
        timeout: config.aggregation.otlp_timeout,
    };
    let counted = OtlpMetrics {
        exports: t.otlp_exports.clone(),
        retries: t.otlp_retries.clone(),
        rejected_points: t.otlp_rejected.clone(),
    };
    Some(Pusher::new(
        otlp,
        Arc::clone(aggregates),
        identity.clone(),
        counted,
    ))
}

/// Everything a run needs, opened before the first thread starts.
pub struct Opened {
    writers: Writers,
    /// Each dump's state and its inetdiagers' sinks.
    families: Vec<(Arc<FamilyState>, Vec<Sink>)>,
    /// With `--close-records`: the closer's sockets and sink.
    closes: Option<(Arc<CloseState>, Sink)>,
    namespaces: Namespaces,
    capture: Option<Arc<Capture>>,
    prom: Option<PromServer>,
    /// With `--otlp-url`: the thread that pushes the aggregates.
    otlp: Option<Pusher>,
    reporting: Reporting,
}

impl Opened {
    pub fn open(
        config: &Config,
        identity: &Identity,
        output: &Output,
        shutdown: &Shutdown,
    ) -> Result<Opened, RunError> {
        cgroup::check_fits(config)
            .map_err(|e| setup("checking the memory limit")(io::Error::other(e)))?;
        let kernel = kernel_release();
        let metrics = Metrics::new(&config.dumps(), pool_capacity(config), &kernel, identity)
            .map_err(|e| setup("registering metrics")(io::Error::other(e)))?;
        let metrics = Arc::new(metrics);
        let mut encoder = RecordEncoder::new(identity.clone());
        let cgroups = config
            .cgroups
            .enabled
            .then(|| open_cgroups(config, &metrics))
            .flatten();
        if let Some(cgroups) = &cgroups {
            encoder = encoder.with_cgroups(cgroups.view());
        }
        let aggregates = open_aggregates(config, &metrics, cgroups.as_ref())?;
        if config.processes {
            let t = &metrics.table;
            let processes = ProcessTable::new(
                "/proc".into(),
                cgroups.as_ref().map(|c| c.root().to_path_buf()),
                ProcessMetrics {
                    sockets: t.process_sockets.clone(),
                    scans: t.process_scans.clone(),
                    descriptors_read: t.process_descriptors_read.clone(),
                    not_found: t.process_not_found.clone(),
                },
            );
            encoder = encoder.with_processes(Arc::new(processes).view());
        }
        let writers = Writers {
            encoder,
            sampler: Sampler::new(config.sampling_modulus),
            tail: TailLayout::for_release(&kernel),
            changes: config
                .snapshot_every
                .map(|n| Arc::new(ChangeTracker::new(n))),
            aggregates,
        };
        let health = Arc::new(Health::new("poll completed"));
        let prom = open_prom(config, &metrics, &health)?;
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
        let sink = || {
            Sink::for_output(output, config, feed_key.clone())
                .map_err(setup("opening the destination"))
        };
        let mut families = Vec::new();
        for family in config.dumps() {
            let pool = BufferPool::new(pool_capacity(config)(&family), config.recv_buffer_len());
            let state = FamilyState::new(family, pool, shutdown.release_fd())
                .map_err(setup("creating the netlinkers' epoll set"))?;
            let sinks = (0..family.inetdiagers)
                .map(|_| sink())
                .collect::<Result<Vec<_>, _>>()?;
            families.push((Arc::new(state), sinks));
        }
        let closes = config
            .close_buffer
            .map(|buffer| {
                let state = CloseState::new(config.families.clone(), buffer, shutdown.release_fd())
                    .map_err(setup("creating the closer's epoll set"))?;
                Ok::<_, RunError>((Arc::new(state), sink()?))
            })
            .transpose()?;
        let namespaces = open_namespaces(config, &families, &closes)?;
        let capture = config
            .capture
            .as_deref()
            .map(Capture::create)
            .transpose()
            .map_err(setup("opening --capture"))?;
        let watermarks = Watermarks::open(
            config,
            output,
            identity,
            feed_key.clone(),
            writers.encoder.clone(),
            metrics.table.watermarks.clone(),
        )
        .map_err(setup("opening the destination"))?;
        let (otlp, otlp_handle) = writers
            .aggregates
            .as_ref()
            .and_then(|a| open_otlp(config, a, identity, &metrics))
            .unzip();
        Ok(Opened {
            writers,
            families,
            closes,
            namespaces,
            capture,
            prom,
            otlp,
            reporting: Reporting {
                metrics,
                health,
                statsd,
                watermarks,
                otlp: otlp_handle,
            },
        })
    }

    /// Starts the netlinkers and inetdiagers, the closer, the metrics
    /// endpoint and last the poller. A thread that cannot start aborts the
    /// run; those already started are joined by [`Running::join`].
    pub fn start(self, config: &Config, shutdown: &Shutdown) -> Running {
        let mut running = Running {
            workers: Vec::new(),
            closer: None,
            prom: None,
            otlp: None,
            poller: None,
            capture: self.capture.clone(),
        };
        let targets = Targets {
            families: self.families.iter().map(|(s, _)| Arc::clone(s)).collect(),
            namespaces: self.namespaces,
            closes: self.closes.as_ref().map(|(state, _)| Arc::clone(state)),
            changes: self.writers.changes.clone(),
            aggregates: self.writers.aggregates.clone(),
        };
        let inetdiager = |sink| Inetdiager {
            writer: self.writers.for_polls(sink),
            capture: self.capture.clone(),
        };
        let started = spawn_workers(config, shutdown, self.families, &inetdiager, &mut running)
            .and_then(|()| {
                if let Some((state, sink)) = self.closes {
                    let closer = Closer {
                        state,
                        writer: self.writers.for_closes(sink),
                        metrics: Arc::clone(&self.reporting.metrics),
                        said: FirstOfEach::new("xtcp: warning: close records"),
                    };
                    let sd = shutdown.clone();
                    running.closer =
                        Some(spawn("closer".into(), shutdown, move || closer.run(&sd))?);
                }
                if let Some(server) = self.prom {
                    running.prom = Some(spawn_prom(config, shutdown, server)?);
                }
                if let Some(pusher) = self.otlp {
                    running.otlp = Some(spawn("otlp".into(), shutdown, move || pusher.run())?);
                }
                let poller = Poller::new(config, shutdown, targets, self.reporting);
                running.poller = Some(spawn("poller".into(), shutdown, move || poller.run())?);
                Ok(())
            });
        if let Err(e) = started {
            shutdown.abort(format!("starting threads: {e}"));
            // Without a poller, nothing else releases the netlinkers.
            shutdown.release_netlinkers();
        }
        running
    }
}

/// The metrics endpoint, bound (its thread starts with the others).
fn open_prom(
    config: &Config,
    metrics: &Metrics,
    health: &Arc<Health>,
) -> Result<Option<PromServer>, RunError> {
    let Some(p) = &config.prom else {
        return Ok(None);
    };
    let (health, stale_after) = (Arc::clone(health), stale_after(config));
    PromServer::bind(
        "xtcp exporter",
        p.listen,
        p.path.clone(),
        metrics.registry().clone(),
        Box::new(move || health.check(stale_after)),
    )
    .map(Some)
    .map_err(setup(format!(
        "serving metrics on --prom-listen {}",
        p.listen
    )))
}

/// The namespaces polled, each with its sockets open. The exporter's own
/// namespace must open; selected ones may come and go, and each poll says
/// which it missed.
fn open_namespaces(
    config: &Config,
    families: &[(Arc<FamilyState>, Vec<Sink>)],
    closes: &Option<(Arc<CloseState>, Sink)>,
) -> Result<Namespaces, RunError> {
    let mut namespaces = Namespaces::new(
        config.netns.clone(),
        config.netlink_timeout,
        closes.as_ref().map(|(state, _)| Arc::clone(state)),
    );
    let states: Vec<Arc<FamilyState>> = families.iter().map(|(s, _)| Arc::clone(s)).collect();
    let problems = namespaces.refresh(&states);
    match (config.netns.is_own(), problems.first()) {
        (true, Some(problem)) => Err(RunError::Setup {
            what: "opening the netlink sock_diag socket".into(),
            source: io::Error::other(problem.clone()),
        }),
        _ => Ok(namespaces),
    }
}

/// The threads of a run.
pub struct Running {
    workers: Vec<JoinHandle<()>>,
    closer: Option<JoinHandle<CloseTotals>>,
    prom: Option<PromThread>,
    /// Ends once the poller (its waker) has.
    otlp: Option<JoinHandle<()>>,
    poller: Option<JoinHandle<(RunTotals, Option<Watermarks>)>>,
    capture: Option<Arc<Capture>>,
}

impl Running {
    /// Waits for the poller to end, joins every thread, ends the capture
    /// and sends the stop's watermark.
    pub fn join(self, shutdown: &Shutdown) -> Result<RunTotals, RunError> {
        let ended = self.poller.and_then(|p| p.join().ok());
        // The poller released the netlinkers when it ended; their exit
        // closes the channels, and the inetdiagers drain them and exit.
        if let Some(prom) = self.prom {
            prom.stop();
        }
        // The last poll's push is made before the thread ends.
        if let Some(otlp) = self.otlp {
            let _ = otlp.join();
        }
        for worker in self.workers {
            // A panicked worker has already recorded the failure.
            let _ = worker.join();
        }
        // The release that ended the netlinkers ends the closer too.
        let close_totals = self.closer.and_then(|c| c.join().ok());
        if let Some(capture) = self.capture {
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
            totals.closes = close_totals;
            totals
        });
        match (shutdown.failure(), totals) {
            (Some(reason), _) => Err(RunError::Aborted(reason)),
            (None, Some(totals)) => Ok(totals),
            (None, None) => Err(RunError::Aborted("the poller stopped unexpectedly".into())),
        }
    }
}

/// How many receive buffers a dump's pool may allocate.
fn pool_capacity(config: &Config) -> impl Fn(&Family) -> usize + '_ {
    move |f| netlinker::pool_capacity(config, f)
}

/// Starts each family's netlinkers and inetdiagers, connected by a bounded
/// channel. The channel closes when the last netlinker exits.
fn spawn_workers(
    config: &Config,
    shutdown: &Shutdown,
    families: Vec<(Arc<FamilyState>, Vec<Sink>)>,
    inetdiager: &dyn Fn(Sink) -> Inetdiager,
    running: &mut Running,
) -> io::Result<()> {
    for (state, sinks) in families {
        let name = state.family.name();
        let (tx, rx) = crossbeam_channel::bounded(netlinker::channel_batches(config));
        for i in 0..state.family.netlinkers {
            let (state, tx, sd) = (Arc::clone(&state), tx.clone(), shutdown.clone());
            running.workers.push(spawn(
                format!("netlinker-{name}-{i}"),
                shutdown,
                move || netlinker::run(&state, tx, &sd),
            )?);
        }
        for (i, sink) in sinks.into_iter().enumerate() {
            let inetdiager = inetdiager(sink);
            let (rx, sd) = (rx.clone(), shutdown.clone());
            running.workers.push(spawn(
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
