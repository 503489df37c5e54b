//! Command line (and `XTCP_*` environment variables) -> validated [`Config`].
//!
//! Parsed once in `main`. A bad value exits 2 with one line naming the flag
//! and what was wrong. `--print-config` prints the effective configuration in
//! the `KEY=value` form of a systemd `EnvironmentFile`, which parses back to
//! the same [`Config`].

use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};

use crate::export::record::MAX_NETNS_NAME_LEN;
use crate::filter::Filter;
use crate::wire::request::{
    AF_INET, AF_INET6, AF_UNSPEC, ALL_EXTENSIONS, ALL_STATES, DEFAULT_STATES,
};
use crate::wire::state;
use xtcp_service::cli::{parse_positive_duration, ranged, Generate};

/// Largest UDP payload over IPv4 (65535 - 20 IP - 8 UDP).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// `--snapshot-every`.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10;
/// `--close-buffer`: 4 MiB hold ~10k close messages.
pub const DEFAULT_CLOSE_BUFFER: u64 = 4 << 20;
/// The most a close socket's receive buffer grows to after overruns. Socket
/// memory is the kernel's, not the process's; 64 MiB hold ~160k messages.
pub const MAX_CLOSE_BUFFER: usize = 64 << 20;
/// Default `--udp-batch-bytes`: see docs/performance.md, "UDP batching".
pub const DEFAULT_UDP_BATCH_BYTES: usize = MAX_UDP_PAYLOAD;
const DEFAULT_PROM_LISTEN: &str = "127.0.0.1:9000";
const DEFAULT_PROM_PATH: &str = "/metrics";
const DEFAULT_STATSD_DST: &str = "127.0.0.1:8125";
/// Smallest receive buffer on a kernel with `page`-byte pages: the kernel
/// fills a dump datagram up to `NLMSG_GOODSIZE` (one page, at most 8 KiB,
/// less its bookkeeping) even when the reader offers less, so a 64 KiB-page
/// kernel needs 8 KiB where a 4 KiB-page one needs 4 KiB.
fn min_recv_buffer(page: usize) -> usize {
    page.clamp(4096, 8192)
}
/// Largest receive buffer accepted. A dump datagram is at most
/// [`DUMP_DATAGRAM_MAX`](crate::pipeline::sock_diag::DUMP_DATAGRAM_MAX)
/// bytes, which the default (8 pages of 4 KiB) is, so
/// more only wastes memory.
const MAX_RECV_BUFFER: usize = 1 << 20;

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// One JSON object per line on standard output.
    Stdout,
    /// Protobuf records in UDP datagrams to this address.
    Udp(SocketAddr),
}

impl FromStr for Dest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "stdout" {
            return Ok(Dest::Stdout);
        }
        let Some(addr) = s.strip_prefix("udp:") else {
            return Err(format!(
                "unknown destination '{s}' (supported: udp:HOST:PORT, stdout)"
            ));
        };
        // Resolved once at startup: a name that moves needs a restart.
        let addrs = addr
            .to_socket_addrs()
            .map_err(|e| format!("'{s}': {e} (expected udp:HOST:PORT)"))?;
        prefer_ipv4(addrs)
            .map(Dest::Udp)
            .ok_or_else(|| format!("'{s}': the name has no address"))
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dest::Stdout => f.write_str("stdout"),
            Dest::Udp(addr) => write!(f, "udp:{addr}"),
        }
    }
}

/// A comma-separated list of state names, `all` standing for every state
/// but bound-inactive -> `1 << state` bits.
fn parse_states(s: &str) -> Result<u32, String> {
    s.split(',').try_fold(0u32, |mask, name| {
        let name = name.trim();
        if name == "all" {
            return Ok(mask | DEFAULT_STATES);
        }
        state::by_name(name).map(|n| mask | 1 << n).ok_or_else(|| {
            let known: Vec<_> = state::names(ALL_STATES).collect();
            format!(
                "unknown state '{name}' (all, or a list of: {})",
                known.join(",")
            )
        })
    })
}

fn states_to_string(mask: u32) -> String {
    if mask & DEFAULT_STATES == DEFAULT_STATES {
        let rest = state::names(mask & !DEFAULT_STATES);
        return std::iter::once("all")
            .chain(rest)
            .collect::<Vec<_>>()
            .join(",");
    }
    state::names(mask).collect::<Vec<_>>().join(",")
}

/// A `--netns` value: a name (no `/`) or a path, recorded in every record
/// of the namespace, so at most `MAX_NETNS_NAME_LEN` bytes. Blank is
/// allowed here and means none (an empty `XTCP_NETNS=`).
fn parse_netns(s: &str) -> Result<String, String> {
    if s.len() > MAX_NETNS_NAME_LEN {
        return Err(format!(
            "longer than {MAX_NETNS_NAME_LEN} bytes (names are recorded with every socket)"
        ));
    }
    if matches!(s, "." | "..") {
        return Err(format!("'{s}' is not a namespace name"));
    }
    Ok(s.to_string())
}

fn parse_safety_buffer(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("'{s}': {e}"))?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("{s} is not a fraction in (0, 1]"));
    }
    Ok(v)
}

/// `HOST:PORT`, resolved once at startup.
fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("'{s}': {e} (expected HOST:PORT)"))?;
    prefer_ipv4(addrs).ok_or_else(|| format!("'{s}': the name has no address"))
}

/// The address a name stands for: its first IPv4 one if it has any. A name
/// such as `localhost` may resolve to `::1` first, while the forwarder, the
/// debug server and statsd daemons listen on 127.0.0.1 by default, so the
/// records would go where nobody listens.
fn prefer_ipv4(addrs: impl Iterator<Item = SocketAddr>) -> Option<SocketAddr> {
    let mut first = None;
    for addr in addrs {
        if addr.is_ipv4() {
            return Some(addr);
        }
        first.get_or_insert(addr);
    }
    first
}

/// An absolute URL path of plain characters, not the health check's.
fn parse_http_path(s: &str) -> Result<String, String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/-._~".contains(c);
    if !s.starts_with('/') || !s.chars().all(plain) {
        return Err(format!(
            "'{s}': expected a path like /metrics (letters, digits, / - . _ ~)"
        ));
    }
    if s == "/healthz" || s == "/" {
        return Err(format!("'{s}' is taken by the health check and index"));
    }
    Ok(s.to_string())
}

/// A path, or blank for none (`XTCP_FEED_KEY=` in an environment file).
fn parse_optional_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

fn parse_batch_bytes(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|e| format!("'{s}': {e}"))?;
    if v != 0 && !(512..=MAX_UDP_PAYLOAD).contains(&v) {
        return Err(format!(
            "{v}: use 0 (one record per datagram) or 512..={MAX_UDP_PAYLOAD}"
        ));
    }
    Ok(v)
}

/// xtcp: export every TCP socket of this host (netlink sock_diag) as
/// protobuf records over UDP.
///
/// Every flag can also be set from the environment variable named in its
/// help (for a systemd EnvironmentFile); a flag on the command line wins.
#[derive(Debug, Parser)]
#[command(name = "xtcp", version, about, long_about = None)]
struct Cli {
    /// Time from one poll's start to the next (e.g. 30s, 500ms, 1m).
    #[arg(long, env = "XTCP_FREQUENCY", default_value = "30s", value_parser = parse_positive_duration)]
    frequency: Duration,

    /// Number of polls to run, then exit; 0 polls until stopped.
    #[arg(long, env = "XTCP_MAX_LOOPS", default_value_t = 0)]
    max_loops: u64,

    /// One poll to stdout, like `ss`: no metrics endpoint, no statsd (their
    /// flags are ignored); exit 0 when the poll was whole, 3 when anything
    /// was lost or skipped.
    #[arg(long, conflicts_with_all = [
        "max_loops", "frequency", "dest", "feed_key", "close_records", "changes_only",
    ])]
    once: bool,

    /// How --dest stdout prints a record: json (one object per line) or
    /// text (one ss-like line).
    #[arg(long, env = "XTCP_FORMAT", value_enum, default_value_t = OutputFormat::Json)]
    format: OutputFormat,

    /// Warn and count a long poll when one takes longer than this fraction
    /// of --frequency.
    #[arg(long, env = "XTCP_POLLING_SAFETY_BUFFER", default_value_t = 0.8, value_parser = parse_safety_buffer)]
    polling_safety_buffer: f64,

    /// Give up on a dump when the kernel sends nothing for this long (time
    /// spent waiting on a slow output does not count).
    #[arg(long, env = "XTCP_NETLINK_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    netlink_timeout: Duration,

    /// With both families polled: one dump of both (combined: one walk of
    /// the kernel's socket tables, read by the larger of the two netlinker
    /// counts and decoded by both inetdiager counts together), or one dump
    /// per family read in parallel (per-family: each table walked twice).
    #[arg(long, env = "XTCP_DUMP_LAYOUT", value_enum, default_value_t = DumpLayout::Combined)]
    dump_layout: DumpLayout,

    /// Threads reading the IPv4 netlink socket.
    #[arg(long, env = "XTCP_NETLINKERS4", default_value_t = 1, value_parser = ranged(1, 64))]
    netlinkers4: u64,

    /// Threads reading the IPv6 netlink socket.
    #[arg(long, env = "XTCP_NETLINKERS6", default_value_t = 1, value_parser = ranged(1, 64))]
    netlinkers6: u64,

    /// Threads decoding, sampling and sending IPv4 sockets.
    #[arg(long, env = "XTCP_INETDIAGERS4", default_value_t = 1, value_parser = ranged(1, 64))]
    inetdiagers4: u64,

    /// Threads decoding, sampling and sending IPv6 sockets.
    #[arg(long, env = "XTCP_INETDIAGERS6", default_value_t = 1, value_parser = ranged(1, 64))]
    inetdiagers6: u64,

    /// One thread of each kind per family (overrides the four counts above).
    #[arg(long, env = "XTCP_SINGLE")]
    single: bool,

    /// Netlink receive buffer unit in bytes; 0 means the page size.
    /// Buffer = --packet-size x --packet-size-mply, 4 KiB..1 MiB.
    #[arg(long, env = "XTCP_PACKET_SIZE", default_value_t = 0, value_parser = ranged(0, 1 << 20))]
    packet_size: u64,

    /// Netlink receive buffer multiplier (see --packet-size).
    #[arg(long, env = "XTCP_PACKET_SIZE_MPLY", default_value_t = 8, value_parser = ranged(1, 256))]
    packet_size_mply: u64,

    /// Capacity of each family's netlinker -> inetdiager channel, in
    /// receive buffers. When it is full the netlinker waits (counted).
    #[arg(long, env = "XTCP_CHANNEL_SIZE", default_value_t = 100, value_parser = ranged(1, 100_000))]
    channel_size: u64,

    /// Export one socket in N, chosen by a hash of the socket cookie so the
    /// same sockets are exported on every poll. 1 exports every socket.
    #[arg(long, env = "XTCP_SAMPLING_MODULUS", default_value_t = 1, value_parser = ranged(1, u64::from(u32::MAX)))]
    sampling_modulus: u64,

    /// Do not poll IPv4 sockets.
    #[arg(long, env = "XTCP_NO4")]
    no4: bool,

    /// Do not poll IPv6 sockets.
    #[arg(long, env = "XTCP_NO6")]
    no6: bool,

    /// TCP states to dump: a comma-separated list such as
    /// established,time-wait (names as in `ss state`); all is every state
    /// but bound-inactive, which makes each dump walk the bind table too.
    #[arg(long, env = "XTCP_STATES", default_value = "all", value_parser = parse_states)]
    states: u32,

    /// Only sockets matching this expression, tested by the kernel, e.g.
    /// 'not (sport 22 or dst 10.0.0.0/8)'. Tests: sport/dport PORT, LOW-HIGH
    /// or a comparison (>= 1024); src/dst ADDRESS[/LEN]; combined with and,
    /// or, not and parentheses (docs/filter.md). Blank: every socket.
    #[arg(long, env = "XTCP_FILTER", value_name = "EXPR")]
    filter: Option<Filter>,

    /// Poll this network namespace: a name under /run/netns or a path such
    /// as /proc/PID/ns/net (repeatable; comma-separated in the environment).
    /// Without --netns and --all-netns: the exporter's own namespace.
    #[arg(long, env = "XTCP_NETNS", value_name = "NAME|PATH", value_delimiter = ',', value_parser = parse_netns)]
    netns: Vec<String>,

    /// Poll every network namespace of the host, looked up again at every
    /// poll: those under /run/netns and /run/docker/netns, and those only a
    /// process holds (/proc/PID/ns/net), this one included (with --netns:
    /// those too).
    #[arg(long, env = "XTCP_ALL_NETNS")]
    all_netns: bool,

    /// Where records go: udp:HOST:PORT (protobuf) or stdout (JSON lines).
    #[arg(long, env = "XTCP_DEST", default_value = "udp:127.0.0.1:13000")]
    dest: Dest,

    /// Pack records into UDP datagrams of at most this many bytes (an
    /// xtcp.v1.Envelope of length-delimited records); 0 sends one bare
    /// Record per datagram.
    #[arg(long, env = "XTCP_UDP_BATCH_BYTES", default_value_t = DEFAULT_UDP_BATCH_BYTES, value_parser = parse_batch_bytes)]
    udp_batch_bytes: usize,

    /// Export a socket only when it is new or its state or counters moved
    /// since its last export, with every socket every --snapshot-every
    /// polls (docs/lifecycle.md).
    #[arg(long, env = "XTCP_CHANGES_ONLY")]
    changes_only: bool,

    /// With --changes-only: every Nth poll (the first included) exports
    /// every socket, so a consumer can rebuild the table.
    #[arg(long, env = "XTCP_SNAPSHOT_EVERY", default_value_t = DEFAULT_SNAPSHOT_EVERY, value_parser = ranged(1, 1_000_000))]
    snapshot_every: u64,

    /// Also export a record for every TCP socket destroyed in a polled
    /// namespace, with its final state, as the kernel reports it
    /// (record_kind closed; docs/lifecycle.md).
    #[arg(long, env = "XTCP_CLOSE_RECORDS")]
    close_records: bool,

    /// Receive buffer for the kernel's close messages, bytes; it doubles
    /// (up to 64 MiB) each time messages are lost to a full one.
    #[arg(long, env = "XTCP_CLOSE_BUFFER", default_value_t = DEFAULT_CLOSE_BUFFER, value_parser = ranged(4096, MAX_CLOSE_BUFFER as u64))]
    close_buffer: u64,

    /// Write the socket messages of every dump to FILE as received, then
    /// NLMSG_DONE: the format `ss -D` writes and reads from TCPDIAG_FILE.
    #[arg(long, env = "XTCP_CAPTURE", value_name = "FILE", value_parser = parse_optional_path)]
    capture: Option<PathBuf>,

    /// Decode the dump in FILE (from --capture or `ss -D`) as one poll,
    /// instead of asking the kernel, and send its records as usual.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "netns", "all_netns", "filter", "states", "close_records", "changes_only",
        "capture", "max_loops", "frequency",
    ])]
    replay: Option<PathBuf>,

    /// Sign every UDP datagram with the key in this file (HMAC-SHA256, a
    /// 16-byte tag at its end), for receivers given the same key.
    #[arg(long, env = "XTCP_FEED_KEY", value_name = "FILE", value_parser = parse_optional_path)]
    feed_key: Option<PathBuf>,

    /// Serve Prometheus metrics and /healthz over HTTP on this HOST:PORT
    /// (port 0 picks a free one, printed at start).
    #[arg(long, env = "XTCP_PROM_LISTEN", default_value = DEFAULT_PROM_LISTEN, value_parser = parse_socket_addr)]
    prom_listen: SocketAddr,

    /// HTTP path of the Prometheus metrics.
    #[arg(long, env = "XTCP_PROM_PATH", default_value = DEFAULT_PROM_PATH, value_parser = parse_http_path)]
    prom_path: String,

    /// Do not serve Prometheus metrics.
    #[arg(long, env = "XTCP_NO_PROM")]
    no_prom: bool,

    /// Send statsd metrics after every poll to this HOST:PORT (UDP).
    #[arg(long, env = "XTCP_STATSD_DST", default_value = DEFAULT_STATSD_DST, value_parser = parse_socket_addr)]
    statsd_dst: SocketAddr,

    /// Do not send statsd metrics.
    #[arg(long, env = "XTCP_NO_STATSD")]
    no_statsd: bool,

    /// Print one line per poll to stderr (otherwise only warnings and the
    /// totals at exit).
    #[arg(short, long, env = "XTCP_VERBOSE")]
    verbose: bool,

    /// Print the effective configuration as KEY=value lines and exit.
    #[arg(long)]
    print_config: bool,

    #[command(flatten)]
    generate: Generate,
}

/// One address family's dump and its thread counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// AF_INET or AF_INET6.
    pub af: u8,
    pub netlinkers: usize,
    pub inetdiagers: usize,
}

impl Family {
    /// "v4" / "v6" ("all" for the combined dump), for thread names,
    /// messages and the metrics' `family` label.
    pub fn name(&self) -> &'static str {
        match self.af {
            AF_INET6 => "v6",
            AF_UNSPEC => "all",
            _ => "v4",
        }
    }
}

/// `--dump-layout`: how the dumps of two families are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpLayout {
    /// One `TCPDIAG_GETSOCK` dump of both families: one walk of the tables.
    Combined,
    /// One `SOCK_DIAG_BY_FAMILY` dump per family, read in parallel.
    PerFamily,
}

impl DumpLayout {
    pub fn name(self) -> &'static str {
        match self {
            DumpLayout::Combined => "combined",
            DumpLayout::PerFamily => "per-family",
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub frequency: Duration,
    pub max_loops: u64,
    /// `--once`: one poll by hand; the exit status says whether it was whole.
    pub once: bool,
    /// How `--dest stdout` prints records.
    pub format: OutputFormat,
    pub polling_safety_buffer: f64,
    pub netlink_timeout: Duration,
    /// Enabled families, in this order.
    pub families: Vec<Family>,
    /// `--dump-layout`; [`Config::dumps`] applies it.
    pub dump_layout: DumpLayout,
    pub single: bool,
    /// `--packet-size` with 0 resolved to the page size.
    pub packet_size: usize,
    pub packet_size_mply: usize,
    pub channel_size: usize,
    pub sampling_modulus: u64,
    /// `1 << state` bits.
    pub states: u32,
    /// Sent with each dump request; `None` dumps every socket.
    pub filter: Option<Filter>,
    pub netns: NetnsSelection,
    /// `1 << (INET_DIAG_X - 1)` bits.
    pub extensions: u8,
    pub dest: Dest,
    pub udp_batch_bytes: usize,
    /// `--feed-key`: the key file, read at start.
    pub feed_key: Option<PathBuf>,
    /// `--capture`: where the dumps' messages are written.
    pub capture: Option<PathBuf>,
    /// `--replay`: the dump file decoded instead of polling.
    pub replay: Option<PathBuf>,
    /// `--close-records`: the receive buffer of the close sockets, if on.
    pub close_buffer: Option<usize>,
    /// `--changes-only`: a full snapshot every this many polls, if on.
    pub snapshot_every: Option<u64>,
    /// Where Prometheus metrics are served; `None` with `--no-prom`.
    pub prom: Option<PromEndpoint>,
    /// Where statsd lines go; `None` with `--no-statsd`.
    pub statsd: Option<SocketAddr>,
    pub verbose: bool,
}

/// `--netns` and `--all-netns`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetnsSelection {
    /// Names under /run/netns and paths, as given.
    pub names: Vec<String>,
    /// Every namespace of the host too (`--all-netns`).
    pub all: bool,
}

impl NetnsSelection {
    /// Neither flag: the exporter's own namespace only.
    pub fn is_own(&self) -> bool {
        self.names.is_empty() && !self.all
    }
}

/// How `--dest stdout` prints a record (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per line (proto field names).
    Json,
    /// One `ss`-like line (`xtcp::export::text`).
    Text,
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Json => "json",
            OutputFormat::Text => "text",
        }
    }
}

/// `--prom-listen` and `--prom-path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromEndpoint {
    pub listen: SocketAddr,
    pub path: String,
}

/// A command line that cannot run, or a request for text output.
#[derive(Debug)]
pub enum ArgsError {
    /// clap's own: `--help`/`--version` (exit 0) or a malformed command
    /// line (exit 2); [`xtcp_service::cli::exit_for`] says which.
    Clap(clap::Error),
    /// `--print-config`: print this and exit 0.
    PrintConfig(String),
    /// `--man`, `--completions SHELL`: print this and exit 0.
    Print(String),
    /// Exit 2 with this one line.
    Invalid(String),
}

impl Config {
    pub fn from_args<I, T>(args: I) -> Result<Config, ArgsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(ArgsError::Clap)?;
        if let Some(text) = cli.generate.text(Cli::command()) {
            return Err(ArgsError::Print(text));
        }
        let config =
            Config::validate(&cli).map_err(|e| ArgsError::Invalid(format!("error: {e}")))?;
        if cli.print_config {
            return Err(ArgsError::PrintConfig(config.to_env_file()));
        }
        Ok(config)
    }

    fn validate(cli: &Cli) -> Result<Config, String> {
        let threads = |n: u64| if cli.single { 1 } else { n as usize };
        let families: Vec<Family> = [
            (!cli.no4).then_some(Family {
                af: AF_INET,
                netlinkers: threads(cli.netlinkers4),
                inetdiagers: threads(cli.inetdiagers4),
            }),
            (!cli.no6).then_some(Family {
                af: AF_INET6,
                netlinkers: threads(cli.netlinkers6),
                inetdiagers: threads(cli.inetdiagers6),
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        if families.is_empty() {
            return Err("--no4 and --no6 together leave nothing to poll".into());
        }
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as usize);
        let packet_size = match cli.packet_size {
            0 => page,
            n => n as usize,
        };
        let mply = cli.packet_size_mply as usize;
        let buffer = packet_size * mply;
        let min = min_recv_buffer(page);
        if !(min..=MAX_RECV_BUFFER).contains(&buffer) {
            return Err(format!(
                "--packet-size {packet_size} x --packet-size-mply {mply} = {buffer} bytes, \
                 outside {min}..={MAX_RECV_BUFFER} (pages of {page} bytes)"
            ));
        }
        // Blank (`XTCP_FEED_KEY=`): none.
        let feed_key = cli.feed_key.clone().filter(|p| !p.as_os_str().is_empty());
        let dest = if cli.once { Dest::Stdout } else { cli.dest };
        if cli.format != OutputFormat::Json && dest != Dest::Stdout {
            return Err(format!(
                "--format {} is for --dest stdout; UDP carries protobuf",
                cli.format.name()
            ));
        }
        if feed_key.is_some() && dest == Dest::Stdout {
            return Err("--feed-key signs UDP datagrams, and --dest stdout sends none".into());
        }
        if cli.states == 0 {
            return Err("--states selects no state".into());
        }
        Ok(Config {
            frequency: cli.frequency,
            max_loops: if cli.once { 1 } else { cli.max_loops },
            once: cli.once,
            format: cli.format,
            polling_safety_buffer: cli.polling_safety_buffer,
            netlink_timeout: cli.netlink_timeout,
            families,
            dump_layout: cli.dump_layout,
            single: cli.single,
            packet_size,
            packet_size_mply: mply,
            channel_size: cli.channel_size as usize,
            sampling_modulus: cli.sampling_modulus,
            states: cli.states,
            // Blank (`XTCP_FILTER=` in an environment file): no filter.
            filter: cli.filter.clone().filter(|f| !f.is_blank()),
            netns: NetnsSelection {
                // Blank (`XTCP_NETNS=`): none.
                names: cli
                    .netns
                    .iter()
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .collect(),
                all: cli.all_netns,
            },
            extensions: ALL_EXTENSIONS,
            dest,
            udp_batch_bytes: cli.udp_batch_bytes,
            feed_key,
            // Blank (`XTCP_CAPTURE=`): none.
            capture: cli.capture.clone().filter(|p| !p.as_os_str().is_empty()),
            replay: cli.replay.clone(),
            close_buffer: cli.close_records.then_some(cli.close_buffer as usize),
            snapshot_every: cli.changes_only.then_some(cli.snapshot_every),
            prom: (!cli.no_prom && !cli.once).then(|| PromEndpoint {
                listen: cli.prom_listen,
                path: cli.prom_path.clone(),
            }),
            statsd: (!cli.no_statsd && !cli.once).then_some(cli.statsd_dst),
            verbose: cli.verbose,
        })
    }

    /// Bytes of one netlink receive buffer.
    pub fn recv_buffer_len(&self) -> usize {
        self.packet_size * self.packet_size_mply
    }

    /// What each poll asks the kernel for, one entry per dump of a
    /// namespace: the enabled families, or with both and the combined
    /// layout, one dump of both (`AF_UNSPEC`) with the larger netlinker
    /// count (one socket is read by one thread at a time) and the
    /// inetdiagers of both (`--single`: one).
    pub fn dumps(&self) -> Vec<Family> {
        match (self.dump_layout, &self.families[..]) {
            (DumpLayout::Combined, [a, b]) => vec![Family {
                af: AF_UNSPEC,
                netlinkers: a.netlinkers.max(b.netlinkers),
                inetdiagers: if self.single {
                    1
                } else {
                    a.inetdiagers + b.inetdiagers
                },
            }],
            _ => self.families.clone(),
        }
    }

    fn family(&self, af: u8) -> Option<&Family> {
        self.families.iter().find(|f| f.af == af)
    }

    /// The effective configuration as `XTCP_*=value` lines.
    pub fn to_env_file(&self) -> String {
        let default = Family {
            af: 0,
            netlinkers: 1,
            inetdiagers: 1,
        };
        let v4 = self.family(AF_INET);
        let v6 = self.family(AF_INET6);
        let dur = |d: Duration| humantime::format_duration(d).to_string();
        let lines: Vec<(&str, String)> = vec![
            ("FREQUENCY", dur(self.frequency)),
            ("MAX_LOOPS", self.max_loops.to_string()),
            ("FORMAT", self.format.name().to_string()),
            (
                "POLLING_SAFETY_BUFFER",
                self.polling_safety_buffer.to_string(),
            ),
            ("NETLINK_TIMEOUT", dur(self.netlink_timeout)),
            ("DUMP_LAYOUT", self.dump_layout.name().to_string()),
            ("NETLINKERS4", v4.unwrap_or(&default).netlinkers.to_string()),
            ("NETLINKERS6", v6.unwrap_or(&default).netlinkers.to_string()),
            (
                "INETDIAGERS4",
                v4.unwrap_or(&default).inetdiagers.to_string(),
            ),
            (
                "INETDIAGERS6",
                v6.unwrap_or(&default).inetdiagers.to_string(),
            ),
            ("SINGLE", self.single.to_string()),
            ("PACKET_SIZE", self.packet_size.to_string()),
            ("PACKET_SIZE_MPLY", self.packet_size_mply.to_string()),
            ("CHANNEL_SIZE", self.channel_size.to_string()),
            ("SAMPLING_MODULUS", self.sampling_modulus.to_string()),
            ("NO4", v4.is_none().to_string()),
            ("NO6", v6.is_none().to_string()),
            ("STATES", states_to_string(self.states)),
            (
                "FILTER",
                self.filter
                    .as_ref()
                    .map_or(String::new(), Filter::to_string),
            ),
            ("NETNS", self.netns.names.join(",")),
            ("ALL_NETNS", self.netns.all.to_string()),
            ("DEST", self.dest.to_string()),
            ("UDP_BATCH_BYTES", self.udp_batch_bytes.to_string()),
            (
                "CAPTURE",
                self.capture
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
            ),
            ("CHANGES_ONLY", self.snapshot_every.is_some().to_string()),
            (
                "SNAPSHOT_EVERY",
                self.snapshot_every
                    .unwrap_or(DEFAULT_SNAPSHOT_EVERY)
                    .to_string(),
            ),
            ("CLOSE_RECORDS", self.close_buffer.is_some().to_string()),
            (
                "CLOSE_BUFFER",
                self.close_buffer
                    .unwrap_or(DEFAULT_CLOSE_BUFFER as usize)
                    .to_string(),
            ),
            (
                "FEED_KEY",
                self.feed_key
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
            ),
            // Turned off, an endpoint prints its default, which the NO_
            // line below overrides.
            (
                "PROM_LISTEN",
                self.prom
                    .as_ref()
                    .map_or(DEFAULT_PROM_LISTEN.into(), |p| p.listen.to_string()),
            ),
            (
                "PROM_PATH",
                self.prom
                    .as_ref()
                    .map_or(DEFAULT_PROM_PATH.into(), |p| p.path.clone()),
            ),
            ("NO_PROM", self.prom.is_none().to_string()),
            (
                "STATSD_DST",
                self.statsd
                    .map_or(DEFAULT_STATSD_DST.into(), |a| a.to_string()),
            ),
            ("NO_STATSD", self.statsd.is_none().to_string()),
            ("VERBOSE", self.verbose.to_string()),
        ];
        let mut out =
            String::from("# xtcp effective configuration (systemd EnvironmentFile format)\n");
        for (key, value) in lines {
            out.push_str(&format!("XTCP_{key}={value}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::request::BOUND_INACTIVE;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::from_args(std::iter::once("xtcp").chain(args.iter().copied())).map_err(
            |e| match e {
                ArgsError::Invalid(line)
                | ArgsError::PrintConfig(line)
                | ArgsError::Print(line) => line,
                ArgsError::Clap(e) => xtcp_service::cli::first_line(&e.render().to_string()),
            },
        )
    }

    #[test]
    fn defaults_are_conservative() {
        let c = parse(&[]).unwrap();
        let fam = |af| Family {
            af,
            netlinkers: 1,
            inetdiagers: 1,
        };
        assert_eq!(c.families, vec![fam(AF_INET), fam(AF_INET6)]);
        let both = Family {
            af: AF_UNSPEC,
            netlinkers: 1,
            inetdiagers: 2,
        };
        assert_eq!(c.dumps(), vec![both], "one walk of both families");
        assert_eq!(c.frequency, Duration::from_secs(30));
        assert_eq!(c.max_loops, 0);
        assert_eq!(c.dest, Dest::Udp("127.0.0.1:13000".parse().unwrap()));
        assert_eq!(c.states, DEFAULT_STATES);
        assert_eq!(
            c.states & BOUND_INACTIVE,
            0,
            "bound-inactive only when named"
        );
        assert_eq!(c.sampling_modulus, 1);
        assert_eq!(c.polling_safety_buffer, 0.8);
        let prom = c.prom.clone().unwrap();
        assert_eq!(
            (prom.listen, prom.path.as_str()),
            ("127.0.0.1:9000".parse().unwrap(), "/metrics")
        );
        assert_eq!(c.statsd, Some("127.0.0.1:8125".parse().unwrap()));
        assert!(c.recv_buffer_len() >= min_recv_buffer(c.packet_size));
        if c.packet_size == 4096 {
            // The default buffer holds the largest dump datagram, no more.
            assert_eq!(
                c.recv_buffer_len(),
                crate::pipeline::sock_diag::DUMP_DATAGRAM_MAX
            );
        }
    }

    #[test]
    fn dump_layouts() {
        let c = parse(&["--dump-layout", "per-family", "--inetdiagers6", "3"]).unwrap();
        assert_eq!(c.dumps(), c.families);
        let c = parse(&["--netlinkers6", "2", "--inetdiagers6", "3"]).unwrap();
        assert_eq!(
            c.dumps(),
            vec![Family {
                af: AF_UNSPEC,
                netlinkers: 2,
                inetdiagers: 4
            }]
        );
        assert_eq!(c.dumps()[0].name(), "all");
        let single = parse(&["--single", "--inetdiagers6", "3"]).unwrap();
        assert_eq!(single.dumps()[0].inetdiagers, 1);
        // One family has nothing to combine.
        let v6 = parse(&["--no4"]).unwrap();
        assert_eq!(v6.dumps(), v6.families);
    }

    #[test]
    fn single_overrides_thread_counts() {
        let c = parse(&["--netlinkers4", "4", "--inetdiagers6", "8", "--single"]).unwrap();
        assert!(c
            .families
            .iter()
            .all(|f| f.netlinkers == 1 && f.inetdiagers == 1));
        let c = parse(&["--netlinkers4", "4", "--inetdiagers6", "8"]).unwrap();
        assert_eq!(
            (c.families[0].netlinkers, c.families[1].inetdiagers),
            (4, 8)
        );
    }

    #[test]
    fn the_smallest_buffer_holds_a_datagram_on_any_page_size() {
        assert_eq!(min_recv_buffer(4096), 4096);
        assert_eq!(min_recv_buffer(16384), 8192);
        assert_eq!(min_recv_buffer(65536), 8192, "NLMSG_GOODSIZE caps at 8 KiB");
    }

    #[test]
    fn names_with_both_families_go_to_their_ipv4_address() {
        let v6: SocketAddr = "[::1]:13000".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:13000".parse().unwrap();
        assert_eq!(prefer_ipv4([v6, v4].into_iter()), Some(v4));
        assert_eq!(prefer_ipv4([v6].into_iter()), Some(v6), "IPv6 only");
        assert_eq!(prefer_ipv4(std::iter::empty()), None);
        let c = parse(&[
            "--dest",
            "udp:localhost:9",
            "--statsd-dst",
            "localhost:8125",
        ])
        .unwrap();
        assert_eq!(c.dest, Dest::Udp("127.0.0.1:9".parse().unwrap()));
        assert_eq!(c.statsd, Some("127.0.0.1:8125".parse().unwrap()));
    }

    #[test]
    fn destinations_and_states() {
        let c = parse(&["--dest", "udp:[::1]:9", "--states", "established,time-wait"]).unwrap();
        assert_eq!(c.dest, Dest::Udp("[::1]:9".parse().unwrap()));
        assert_eq!(c.states, 1 << 1 | 1 << 6);
        let every = parse(&["--states", "all,bound-inactive"]).unwrap();
        assert_eq!(every.states, ALL_STATES);
        assert_eq!(states_to_string(every.states), "all,bound-inactive");
        assert_eq!(states_to_string(1 << 1 | 1 << 6), "established,time-wait");
        assert_eq!(parse(&["--dest", "stdout"]).unwrap().dest, Dest::Stdout);
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        for (args, needle) in [
            (&["--frequency", "0s"][..], "longer than zero"),
            (&["--frequency", "soon"][..], "--frequency"),
            (&["--dest", "kafka"][..], "unknown destination 'kafka'"),
            (&["--dest", "udp:nowhere"][..], "udp:HOST:PORT"),
            (&["--max-loops", "x"][..], "--max-loops"),
            (&["--no4", "--no6"][..], "nothing to poll"),
            (&["--bogus"][..], "--bogus"),
            (&["--netlinkers4", "0"][..], "outside 1..=64"),
            (&["--sampling-modulus", "0"][..], "--sampling-modulus"),
            (&["--packet-size", "100"][..], "outside 4096"),
            (&["--polling-safety-buffer", "1.5"][..], "(0, 1]"),
            (&["--udp-batch-bytes", "100"][..], "one record per datagram"),
            (&["--prom-listen", "localhost"][..], "HOST:PORT"),
            (&["--prom-listen", "1.2.3.4:99999"][..], "HOST:PORT"),
            (&["--prom-path", "metrics"][..], "like /metrics"),
            (&["--prom-path", "/healthz"][..], "health check"),
            (&["--statsd-dst", ":8125"][..], "--statsd-dst"),
            (&["--netns", ".."][..], "not a namespace name"),
            (
                &["--filter", "sport 22 or dport x"][..],
                "for '--filter <EXPR>': at character 19: 'x' is not a port",
            ),
            (
                &["--states", "established,bogus"][..],
                "unknown state 'bogus'",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains('\n'), "{args:?}: {err:?}");
            assert!(err.starts_with("error:"), "{args:?}: {err:?}");
        }
    }

    /// Every flag with an environment variable appears in --print-config,
    /// and the printed lines, given back as the environment, yield the same
    /// configuration.
    #[test]
    fn print_config_round_trips_through_the_environment() {
        let args = [
            "--frequency",
            "1m 500ms",
            "--no6",
            "--netlinkers4",
            "3",
            "--sampling-modulus",
            "7",
            "--states",
            "listen,established",
            "--filter",
            "sport 22 or not (dst 10.0.0.0/8 and dport >= 1024)",
            "--netns",
            "blue",
            "--netns",
            "/proc/1/ns/net",
            "--all-netns",
            "--dest",
            "stdout",
            "--udp-batch-bytes",
            "0",
            "--packet-size",
            "8192",
            "--packet-size-mply",
            "2",
            "--channel-size",
            "9",
            "-v",
            "--polling-safety-buffer",
            "0.5",
            "--max-loops",
            "4",
            "--netlink-timeout",
            "250ms",
            "--prom-listen",
            "[::1]:9100",
            "--prom-path",
            "/x/metrics",
            "--no-statsd",
        ];
        let config = parse(&args).unwrap();
        let printed = match Config::from_args(
            ["xtcp", "--print-config"]
                .iter()
                .chain(args.iter())
                .copied(),
        ) {
            Err(ArgsError::PrintConfig(text)) => text,
            other => panic!("{other:?}"),
        };
        let env: Vec<(String, String)> = printed
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        for arg in Cli::command().get_arguments() {
            if let Some(var) = arg.get_env() {
                let var = var.to_str().unwrap();
                assert!(
                    env.iter().any(|(k, _)| k == var),
                    "{var} missing:\n{printed}"
                );
            }
        }
        // Parse with the printed values as flags (the env route is clap's
        // and is exercised end to end by the CLI tests).
        let flags: Vec<String> = env
            .iter()
            .flat_map(|(k, v)| {
                let flag = format!("--{}", k["XTCP_".len()..].to_lowercase().replace('_', "-"));
                match v.as_str() {
                    "true" => vec![flag],
                    "false" => vec![],
                    _ => vec![flag, v.clone()],
                }
            })
            .collect();
        let again = parse(&flags.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert_eq!(again, config, "{printed}");
    }
}
