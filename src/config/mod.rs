//! Command line (and `XTCP_*` environment variables) -> validated [`Config`].
//!
//! Parsed once in `main`. A bad value exits 2 with one line naming the flag
//! and what was wrong. `--print-config` prints the effective configuration in
//! the `KEY=value` form of a systemd `EnvironmentFile`, which parses back to
//! the same [`Config`].
//!
//! [`flags`] declares the command line, [`validate`] turns it into a
//! [`Config`], [`env_file`] prints a [`Config`] back as environment lines.

mod env_file;
mod flags;
mod validate;

use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};

use crate::aggregate::AggregateConfig;
use crate::filter::Filter;
use crate::wire::request::{AF_INET6, AF_UNSPEC};
use flags::{prefer_ipv4, Cli};

/// Largest UDP payload over IPv4 (65535 - 20 IP - 8 UDP).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// `--snapshot-every`.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10;
/// `--close-buffer`: 4 MiB hold ~10k close messages.
pub const DEFAULT_CLOSE_BUFFER: u64 = 4 << 20;
/// The most a close socket's receive buffer grows to after overruns. Socket
/// memory is the kernel's, not the process's; 64 MiB hold ~160k messages.
pub const MAX_CLOSE_BUFFER: usize = 64 << 20;
/// `--cgroup-cache`: cgroups the map of the cgroup tree keeps.
pub const DEFAULT_CGROUP_CACHE: u64 = 65_536;
/// `--aggregate-groups`: with ~60 series a group, at most ~6000 series.
pub const DEFAULT_AGGREGATE_GROUPS: u64 = 100;
/// `--aggregate-ttl`, polls: 5 minutes at the default frequency.
pub const DEFAULT_AGGREGATE_TTL: u64 = 10;
/// Default `--udp-batch-bytes`: see docs/performance.md, "UDP batching".
pub const DEFAULT_UDP_BATCH_BYTES: usize = MAX_UDP_PAYLOAD;
pub(super) const DEFAULT_PROM_LISTEN: &str = "127.0.0.1:9000";
pub(super) const DEFAULT_PROM_PATH: &str = "/metrics";
pub(super) const DEFAULT_STATSD_DST: &str = "127.0.0.1:8125";

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
    pub cgroups: CgroupPaths,
    /// `--processes`: records name their socket's processes (not with
    /// `--replay`: another host's inodes).
    pub processes: bool,
    /// The per-service aggregates and where they go.
    pub aggregation: Aggregation,
    /// Where Prometheus metrics are served; `None` with `--no-prom`.
    pub prom: Option<PromEndpoint>,
    /// Where statsd lines go; `None` with `--no-statsd`.
    pub statsd: Option<SocketAddr>,
    pub verbose: bool,
}

/// How cgroup ids are resolved to paths (`crate::attribution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupPaths {
    /// Records carry their socket's cgroup path and owner; not with
    /// `--no-cgroup-paths` or `--replay` (another host's ids).
    pub enabled: bool,
    /// `--cgroup-cache`: most cgroups kept.
    pub cache: usize,
    /// `--cgroup-rescan`: least time between two walks of the tree.
    pub rescan: Duration,
}

/// `--no-aggregates`, `--aggregate-*` and `--otlp-*` (`crate::aggregate`).
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregation {
    /// Off with `--no-aggregates`, with `--once` and `--replay` (no polls),
    /// and with neither a metrics endpoint nor `--otlp-url` to read them.
    pub enabled: bool,
    pub groups: AggregateConfig,
    /// `--otlp-url`, if given.
    pub otlp_url: Option<hyper::Uri>,
    pub otlp_timeout: Duration,
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
}

#[cfg(test)]
pub(super) mod tests {
    use super::env_file::states_to_string;
    use super::validate::min_recv_buffer;
    use super::*;
    use crate::wire::request::BOUND_INACTIVE;
    use crate::wire::request::{AF_INET, ALL_STATES, DEFAULT_STATES};

    pub(super) fn parse(args: &[&str]) -> Result<Config, String> {
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
}
