//! The exporter's command line: every flag, its environment variable, its
//! default and how its value is read.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::{
    Dest, DumpLayout, OutputFormat, DEFAULT_AGGREGATE_GROUPS, DEFAULT_AGGREGATE_TTL,
    DEFAULT_CGROUP_CACHE, DEFAULT_CLOSE_BUFFER, DEFAULT_PROM_LISTEN, DEFAULT_PROM_PATH,
    DEFAULT_SNAPSHOT_EVERY, DEFAULT_STATSD_DST, DEFAULT_UDP_BATCH_BYTES, MAX_CLOSE_BUFFER,
    MAX_UDP_PAYLOAD,
};
use crate::aggregate::Network;
use crate::export::record::MAX_NETNS_NAME_LEN;
use crate::filter::Filter;
use crate::wire::request::{ALL_STATES, DEFAULT_STATES};
use crate::wire::state;
use xtcp_service::cli::{parse_positive_duration, ranged, Generate};

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
pub(super) fn prefer_ipv4(addrs: impl Iterator<Item = SocketAddr>) -> Option<SocketAddr> {
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

/// `--aggregate-ports`: ports, comma-separated; blank for none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

fn parse_ports(s: &str) -> Result<PortList, String> {
    let ports = s.split(',').map(str::trim).filter(|p| !p.is_empty());
    ports
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("'{p}' is not a port (1 to 65535)")),
        })
        .collect::<Result<Vec<u16>, String>>()
        .map(PortList)
}

/// `--aggregate-networks`: NAME=PREFIX, comma-separated; blank for none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkList(pub Vec<Network>);

/// Most named networks: their index is a byte of every socket's key.
pub const MAX_NETWORKS: usize = 254;

fn parse_networks(s: &str) -> Result<NetworkList, String> {
    let items = s.split(',').map(str::trim).filter(|n| !n.is_empty());
    let networks = items
        .map(|item| {
            let (name, prefix) = item
                .split_once('=')
                .ok_or_else(|| format!("'{item}' is not NAME=PREFIX"))?;
            let named = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !named || name == "other" {
                return Err(format!(
                    "'{name}': a network's name is 1-64 letters, digits, '_', '.', '-', and not 'other'"
                ));
            }
            let (addr, len) = prefix.split_once('/').unwrap_or((prefix, ""));
            let addr: std::net::IpAddr = addr
                .parse()
                .map_err(|_| format!("'{prefix}' is not an address prefix"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len = match len {
                "" => max,
                l => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                    format!("'{l}' is not a prefix length (0 to {max})")
                })?,
            };
            Ok(Network {
                name: name.to_string(),
                addr,
                len,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if networks.len() > MAX_NETWORKS {
        return Err(format!("more than {MAX_NETWORKS} networks"));
    }
    Ok(NetworkList(networks))
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
pub(super) struct Cli {
    /// Time from one poll's start to the next (e.g. 30s, 500ms, 1m).
    #[arg(long, env = "XTCP_FREQUENCY", default_value = "30s", value_parser = parse_positive_duration)]
    pub(super) frequency: Duration,

    /// Number of polls to run, then exit; 0 polls until stopped.
    #[arg(long, env = "XTCP_MAX_LOOPS", default_value_t = 0)]
    pub(super) max_loops: u64,

    /// One poll to stdout, like `ss`: no metrics endpoint, no statsd (their
    /// flags are ignored); exit 0 when the poll was whole, 3 when anything
    /// was lost or skipped.
    #[arg(long, conflicts_with_all = [
        "max_loops", "frequency", "dest", "feed_key", "close_records", "changes_only",
    ])]
    pub(super) once: bool,

    /// How --dest stdout prints a record: json (one object per line) or
    /// text (one ss-like line).
    #[arg(long, env = "XTCP_FORMAT", value_enum, default_value_t = OutputFormat::Json)]
    pub(super) format: OutputFormat,

    /// Warn and count a long poll when one takes longer than this fraction
    /// of --frequency.
    #[arg(long, env = "XTCP_POLLING_SAFETY_BUFFER", default_value_t = 0.8, value_parser = parse_safety_buffer)]
    pub(super) polling_safety_buffer: f64,

    /// Give up on a dump when the kernel sends nothing for this long (time
    /// spent waiting on a slow output does not count).
    #[arg(long, env = "XTCP_NETLINK_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub(super) netlink_timeout: Duration,

    /// With both families polled: one dump of both (combined: one walk of
    /// the kernel's socket tables, read by the larger of the two netlinker
    /// counts and decoded by both inetdiager counts together), or one dump
    /// per family read in parallel (per-family: each table walked twice).
    #[arg(long, env = "XTCP_DUMP_LAYOUT", value_enum, default_value_t = DumpLayout::Combined)]
    pub(super) dump_layout: DumpLayout,

    /// Threads reading the IPv4 netlink socket.
    #[arg(long, env = "XTCP_NETLINKERS4", default_value_t = 1, value_parser = ranged(1, 64))]
    pub(super) netlinkers4: u64,

    /// Threads reading the IPv6 netlink socket.
    #[arg(long, env = "XTCP_NETLINKERS6", default_value_t = 1, value_parser = ranged(1, 64))]
    pub(super) netlinkers6: u64,

    /// Threads decoding, sampling and sending IPv4 sockets.
    #[arg(long, env = "XTCP_INETDIAGERS4", default_value_t = 1, value_parser = ranged(1, 64))]
    pub(super) inetdiagers4: u64,

    /// Threads decoding, sampling and sending IPv6 sockets.
    #[arg(long, env = "XTCP_INETDIAGERS6", default_value_t = 1, value_parser = ranged(1, 64))]
    pub(super) inetdiagers6: u64,

    /// One thread of each kind per family (overrides the four counts above).
    #[arg(long, env = "XTCP_SINGLE")]
    pub(super) single: bool,

    /// Netlink receive buffer unit in bytes; 0 means the page size.
    /// Buffer = --packet-size x --packet-size-mply, 4 KiB..1 MiB.
    #[arg(long, env = "XTCP_PACKET_SIZE", default_value_t = 0, value_parser = ranged(0, 1 << 20))]
    pub(super) packet_size: u64,

    /// Netlink receive buffer multiplier (see --packet-size).
    #[arg(long, env = "XTCP_PACKET_SIZE_MPLY", default_value_t = 8, value_parser = ranged(1, 256))]
    pub(super) packet_size_mply: u64,

    /// Capacity of each family's netlinker -> inetdiager channel, in
    /// receive buffers. When it is full the netlinker waits (counted).
    #[arg(long, env = "XTCP_CHANNEL_SIZE", default_value_t = 100, value_parser = ranged(1, 100_000))]
    pub(super) channel_size: u64,

    /// Export one socket in N, chosen by a hash of the socket cookie so the
    /// same sockets are exported on every poll. 1 exports every socket.
    #[arg(long, env = "XTCP_SAMPLING_MODULUS", default_value_t = 1, value_parser = ranged(1, u64::from(u32::MAX)))]
    pub(super) sampling_modulus: u64,

    /// Do not poll IPv4 sockets.
    #[arg(long, env = "XTCP_NO4")]
    pub(super) no4: bool,

    /// Do not poll IPv6 sockets.
    #[arg(long, env = "XTCP_NO6")]
    pub(super) no6: bool,

    /// TCP states to dump: a comma-separated list such as
    /// established,time-wait (names as in `ss state`); all is every state
    /// but bound-inactive, which makes each dump walk the bind table too.
    #[arg(long, env = "XTCP_STATES", default_value = "all", value_parser = parse_states)]
    pub(super) states: u32,

    /// Only sockets matching this expression, tested by the kernel, e.g.
    /// 'not (sport 22 or dst 10.0.0.0/8)'. Tests: sport/dport PORT, LOW-HIGH
    /// or a comparison (>= 1024); src/dst ADDRESS[/LEN]; cgroup PATH (as
    /// `ss -e` prints it); combined with and, or, not and parentheses
    /// (docs/filter.md). Blank: every socket.
    #[arg(long, env = "XTCP_FILTER", value_name = "EXPR")]
    pub(super) filter: Option<Filter>,

    /// Poll this network namespace: a name under /run/netns or a path such
    /// as /proc/PID/ns/net (repeatable; comma-separated in the environment).
    /// Without --netns and --all-netns: the exporter's own namespace.
    #[arg(long, env = "XTCP_NETNS", value_name = "NAME|PATH", value_delimiter = ',', value_parser = parse_netns)]
    pub(super) netns: Vec<String>,

    /// Poll every network namespace of the host, looked up again at every
    /// poll: those under /run/netns and /run/docker/netns, and those only a
    /// process holds (/proc/PID/ns/net), this one included (with --netns:
    /// those too).
    #[arg(long, env = "XTCP_ALL_NETNS")]
    pub(super) all_netns: bool,

    /// Where records go: udp:HOST:PORT (protobuf) or stdout (JSON lines).
    #[arg(long, env = "XTCP_DEST", default_value = "udp:127.0.0.1:13000")]
    pub(super) dest: Dest,

    /// Pack records into UDP datagrams of at most this many bytes (an
    /// xtcp.v1.Envelope of length-delimited records); 0 sends one bare
    /// Record per datagram.
    #[arg(long, env = "XTCP_UDP_BATCH_BYTES", default_value_t = DEFAULT_UDP_BATCH_BYTES, value_parser = parse_batch_bytes)]
    pub(super) udp_batch_bytes: usize,

    /// Export a socket only when it is new or its state or counters moved
    /// since its last export, with every socket every --snapshot-every
    /// polls (docs/lifecycle.md).
    #[arg(long, env = "XTCP_CHANGES_ONLY")]
    pub(super) changes_only: bool,

    /// With --changes-only: every Nth poll (the first included) exports
    /// every socket, so a consumer can rebuild the table.
    #[arg(long, env = "XTCP_SNAPSHOT_EVERY", default_value_t = DEFAULT_SNAPSHOT_EVERY, value_parser = ranged(1, 1_000_000))]
    pub(super) snapshot_every: u64,

    /// Leave out the socket's cgroup path and what it tells (systemd unit,
    /// container, pod) from records (docs/record.md, "Whose connection").
    #[arg(long, env = "XTCP_NO_CGROUP_PATHS")]
    pub(super) no_cgroup_paths: bool,

    /// Add the processes holding each socket to its record: PID and
    /// command, all of them when shared (docs/record.md, "Whose
    /// connection"). Reads /proc/PID/fd of every process: new descriptors
    /// only, once per poll with new sockets.
    #[arg(long, env = "XTCP_PROCESSES")]
    pub(super) processes: bool,

    /// Most cgroups the map of the cgroup tree keeps (the shallowest
    /// first); records of the others have no path.
    #[arg(long, env = "XTCP_CGROUP_CACHE", default_value_t = DEFAULT_CGROUP_CACHE, value_parser = ranged(1, 10_000_000))]
    pub(super) cgroup_cache: u64,

    /// Walk the cgroup tree again for a socket's unknown cgroup at most
    /// once per this long (a container started since the last walk).
    #[arg(long, env = "XTCP_CGROUP_RESCAN", default_value = "5s", value_parser = parse_positive_duration)]
    pub(super) cgroup_rescan: Duration,

    /// Do not sum sockets by service and peer group (the xtcp_service_*
    /// metrics and --otlp-url; docs/metrics.md, "Per-service aggregates").
    #[arg(long, env = "XTCP_NO_AGGREGATES")]
    pub(super) no_aggregates: bool,

    /// Most service and peer groups kept; sockets of more go to one group
    /// "other" (counted in xtcp_aggregate_folded_groups).
    #[arg(long, env = "XTCP_AGGREGATE_GROUPS", default_value_t = DEFAULT_AGGREGATE_GROUPS, value_parser = ranged(1, 100_000))]
    pub(super) aggregate_groups: u64,

    /// Polls a group may go without a socket before its series are removed.
    #[arg(long, env = "XTCP_AGGREGATE_TTL", default_value_t = DEFAULT_AGGREGATE_TTL, value_parser = ranged(1, 1_000_000))]
    pub(super) aggregate_ttl: u64,

    /// Remote ports that name a service for client connections, beyond the
    /// well-known 1-1023: a comma-separated list such as 3306,5432,6379.
    /// Clients of other ports are grouped as "ephemeral".
    #[arg(long, env = "XTCP_AGGREGATE_PORTS", value_name = "PORTS", default_value = "", value_parser = parse_ports)]
    pub(super) aggregate_ports: PortList,

    /// Named networks of remote addresses, a label of every group: a
    /// comma-separated list of NAME=PREFIX, e.g. lan=10.0.0.0/8,v6=fd00::/8
    /// (the first that holds an address names it; others are "other").
    #[arg(long, env = "XTCP_AGGREGATE_NETWORKS", value_name = "NAME=PREFIX,...", default_value = "", value_parser = parse_networks)]
    pub(super) aggregate_networks: NetworkList,

    /// Push the aggregates after every poll to this OpenTelemetry collector
    /// as OTLP/HTTP protobuf (gzip), e.g. http://127.0.0.1:4318/v1/metrics.
    #[arg(long, env = "XTCP_OTLP_URL", value_name = "URL", default_value = "")]
    pub(super) otlp_url: String,

    /// Time one push may take before it is tried again (at most 3 tries).
    #[arg(long, env = "XTCP_OTLP_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub(super) otlp_timeout: Duration,

    /// Also export a record for every TCP socket destroyed in a polled
    /// namespace, with its final state, as the kernel reports it
    /// (record_kind closed; docs/lifecycle.md).
    #[arg(long, env = "XTCP_CLOSE_RECORDS")]
    pub(super) close_records: bool,

    /// Receive buffer for the kernel's close messages, bytes; it doubles
    /// (up to 64 MiB) each time messages are lost to a full one.
    #[arg(long, env = "XTCP_CLOSE_BUFFER", default_value_t = DEFAULT_CLOSE_BUFFER, value_parser = ranged(4096, MAX_CLOSE_BUFFER as u64))]
    pub(super) close_buffer: u64,

    /// Write the socket messages of every dump to FILE as received, then
    /// NLMSG_DONE: the format `ss -D` writes and reads from TCPDIAG_FILE.
    #[arg(long, env = "XTCP_CAPTURE", value_name = "FILE", value_parser = parse_optional_path)]
    pub(super) capture: Option<PathBuf>,

    /// Decode the dump in FILE (from --capture or `ss -D`) as one poll,
    /// instead of asking the kernel, and send its records as usual.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "netns", "all_netns", "filter", "states", "close_records", "changes_only",
        "capture", "max_loops", "frequency",
    ])]
    pub(super) replay: Option<PathBuf>,

    /// Sign every UDP datagram with the key in this file (HMAC-SHA256, a
    /// 16-byte tag at its end), for receivers given the same key.
    #[arg(long, env = "XTCP_FEED_KEY", value_name = "FILE", value_parser = parse_optional_path)]
    pub(super) feed_key: Option<PathBuf>,

    /// Serve Prometheus metrics and /healthz over HTTP on this HOST:PORT
    /// (port 0 picks a free one, printed at start).
    #[arg(long, env = "XTCP_PROM_LISTEN", default_value = DEFAULT_PROM_LISTEN, value_parser = parse_socket_addr)]
    pub(super) prom_listen: SocketAddr,

    /// HTTP path of the Prometheus metrics.
    #[arg(long, env = "XTCP_PROM_PATH", default_value = DEFAULT_PROM_PATH, value_parser = parse_http_path)]
    pub(super) prom_path: String,

    /// Do not serve Prometheus metrics.
    #[arg(long, env = "XTCP_NO_PROM")]
    pub(super) no_prom: bool,

    /// Send statsd metrics after every poll to this HOST:PORT (UDP).
    #[arg(long, env = "XTCP_STATSD_DST", default_value = DEFAULT_STATSD_DST, value_parser = parse_socket_addr)]
    pub(super) statsd_dst: SocketAddr,

    /// Do not send statsd metrics.
    #[arg(long, env = "XTCP_NO_STATSD")]
    pub(super) no_statsd: bool,

    /// Print one line per poll to stderr (otherwise only warnings and the
    /// totals at exit).
    #[arg(short, long, env = "XTCP_VERBOSE")]
    pub(super) verbose: bool,

    /// Print the effective configuration as KEY=value lines and exit.
    #[arg(long)]
    pub(super) print_config: bool,

    #[command(flatten)]
    pub(super) generate: Generate,
}
