//! Command line (and `XTCP_FORWARDER_*` environment variables) -> validated
//! [`ForwarderConfig`]. A value librdkafka would refuse, or a topic Kafka
//! cannot have, is a one-line error naming the flag (exit 2) rather than a
//! failure to start.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::spool::MIN_BOUND;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use xtcp_feed::auth::FeedKeyArgs;
use xtcp_service::cli::{parse_duration, parse_positive_duration, ranged, Generate};

/// librdkafka's bound for its integer settings (a C `int`).
const RDKAFKA_INT_MAX: u64 = i32::MAX as u64;
/// librdkafka's bound for `linger.ms`: 900 000 ms.
const MAX_LINGER: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
}

impl Compression {
    /// librdkafka's name (`compression.codec`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

/// `HOST:PORT[,HOST:PORT...]`, each with a port librdkafka can connect to.
fn parse_brokers(s: &str) -> Result<String, String> {
    for broker in s.split(',') {
        let port = broker
            .trim()
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|&port| port != 0);
        if port.is_none() {
            return Err(format!("'{broker}' is not HOST:PORT"));
        }
    }
    Ok(s.to_string())
}

/// A name Kafka accepts for a topic: 1..=249 of `[a-zA-Z0-9._-]`, not `.`
/// or `..`.
fn parse_topic(s: &str) -> Result<String, String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if s.is_empty() || s.len() > 249 || !s.chars().all(legal) || s == "." || s == ".." {
        return Err(format!(
            "'{s}' is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok(s.to_string())
}

fn parse_linger(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_LINGER {
        return Err(format!("'{s}' is longer than librdkafka's 15m"));
    }
    Ok(d)
}

/// xtcp-forwarder: receive xtcp records over UDP and produce them to a
/// Kafka topic, one message (length-delimited xtcp.v1.Records) per datagram.
///
/// Every flag can also be set from the environment variable in its help.
#[derive(Debug, Parser)]
#[command(name = "xtcp-forwarder", version, about, long_about = None)]
struct Cli {
    /// UDP address to receive the exporters' datagrams on.
    #[arg(long, env = "XTCP_FORWARDER_LISTEN", default_value = "127.0.0.1:13000")]
    listen: SocketAddr,

    /// Kafka bootstrap brokers, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "XTCP_FORWARDER_BROKERS", default_value = "127.0.0.1:9092", value_parser = parse_brokers)]
    brokers: String,

    /// Topic to produce to.
    #[arg(long, env = "XTCP_FORWARDER_TOPIC", default_value = "xtcp", value_parser = parse_topic)]
    topic: String,

    /// Compression of the message batches.
    #[arg(
        long,
        env = "XTCP_FORWARDER_COMPRESSION",
        value_enum,
        default_value = "lz4"
    )]
    compression: Compression,

    /// How long the producer waits to fill a batch (linger.ms).
    #[arg(long, env = "XTCP_FORWARDER_LINGER", default_value = "20ms", value_parser = parse_linger)]
    linger: Duration,

    /// Largest batch of messages per partition request, bytes (batch.size).
    #[arg(long, env = "XTCP_FORWARDER_BATCH_BYTES", default_value_t = 1 << 20, value_parser = ranged(1, RDKAFKA_INT_MAX))]
    batch_bytes: u64,

    /// Most messages waiting for the broker; more are dropped and counted.
    #[arg(long, env = "XTCP_FORWARDER_QUEUE_MESSAGES", default_value_t = 100_000, value_parser = ranged(1, RDKAFKA_INT_MAX))]
    queue_messages: u64,

    /// Most bytes waiting for the broker, in KiB; more are dropped and counted.
    #[arg(long, env = "XTCP_FORWARDER_QUEUE_KIB", default_value_t = 256 * 1024, value_parser = ranged(1, RDKAFKA_INT_MAX))]
    queue_kib: u64,

    /// How long a message may wait for the broker's acknowledgement
    /// (retries and reconnections included) before it is counted as dropped.
    #[arg(long, env = "XTCP_FORWARDER_DELIVERY_TIMEOUT", default_value = "2m", value_parser = parse_positive_duration)]
    delivery_timeout: Duration,

    /// At exit, how long to wait for queued messages to be delivered.
    #[arg(long, env = "XTCP_FORWARDER_FLUSH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    flush_timeout: Duration,

    /// UDP receive buffer, bytes (SO_RCVBUFFORCE when root, else SO_RCVBUF
    /// capped by net.core.rmem_max).
    #[arg(long, env = "XTCP_FORWARDER_RECV_BUFFER", default_value_t = 32 << 20)]
    recv_buffer: usize,

    /// Serve Prometheus metrics and /healthz on this HOST:PORT.
    #[arg(
        long,
        env = "XTCP_FORWARDER_PROM_LISTEN",
        default_value = "127.0.0.1:9001"
    )]
    prom_listen: SocketAddr,

    /// Keep what cannot be delivered (a full queue, a delivery timed out,
    /// the brokers down, the stop) in this directory, and produce it again
    /// when the brokers are back, across restarts. Off unless given.
    #[arg(long, env = "XTCP_FORWARDER_SPOOL_DIR", value_name = "DIR")]
    spool_dir: Option<PathBuf>,

    /// The spool's bound, bytes: at it, the oldest data is dropped and
    /// counted.
    #[arg(long, env = "XTCP_FORWARDER_SPOOL_BYTES", default_value_t = 1 << 30, value_parser = ranged(MIN_BOUND, u64::MAX))]
    spool_bytes: u64,

    /// Do not serve metrics.
    #[arg(long, env = "XTCP_FORWARDER_NO_PROM")]
    no_prom: bool,

    #[command(flatten)]
    generate: Generate,

    #[command(flatten)]
    feed_key: FeedKeyArgs,
}

/// What a command line asks for.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<ForwarderConfig>),
    /// `--man`, `--completions SHELL`: print this and exit 0.
    Print(String),
}

/// The forwarder's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    pub listen: SocketAddr,
    pub brokers: String,
    pub topic: String,
    pub compression: Compression,
    pub linger: Duration,
    pub batch_bytes: u64,
    pub queue_messages: u64,
    pub queue_kib: u64,
    pub delivery_timeout: Duration,
    pub flush_timeout: Duration,
    pub recv_buffer: usize,
    /// Where metrics are served; `None` with `--no-prom`.
    pub prom_listen: Option<SocketAddr>,
    /// `--feed-key` files, read at start.
    pub feed_keys: Vec<PathBuf>,
    /// `--spool-dir` and `--spool-bytes`.
    pub spool: Option<SpoolConfig>,
}

/// Where the spool is and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub bytes: u64,
}

impl ForwarderConfig {
    /// Parses and validates a command line (the environment included).
    pub fn from_args<I, T>(args: I) -> Result<Parsed, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut command = FeedKeyArgs::with_env(Cli::command(), "XTCP_FORWARDER_FEED_KEY");
        let matches = command.try_get_matches_from_mut(args)?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        if let Some(text) = cli.generate.text(command) {
            return Ok(Parsed::Print(text));
        }
        Ok(Parsed::Run(Box::new(ForwarderConfig {
            listen: cli.listen,
            brokers: cli.brokers,
            topic: cli.topic,
            compression: cli.compression,
            linger: cli.linger,
            batch_bytes: cli.batch_bytes,
            queue_messages: cli.queue_messages,
            queue_kib: cli.queue_kib,
            delivery_timeout: cli.delivery_timeout,
            flush_timeout: cli.flush_timeout,
            recv_buffer: cli.recv_buffer,
            prom_listen: (!cli.no_prom).then_some(cli.prom_listen),
            feed_keys: cli.feed_key.paths(),
            spool: cli.spool_dir.map(|dir| SpoolConfig {
                dir,
                bytes: cli.spool_bytes,
            }),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xtcp_service::cli::first_line;

    fn parse(args: &[&str]) -> Result<ForwarderConfig, String> {
        match ForwarderConfig::from_args(
            std::iter::once("xtcp-forwarder").chain(args.iter().copied()),
        ) {
            Ok(Parsed::Run(config)) => Ok(*config),
            Ok(Parsed::Print(text)) => Err(text),
            Err(e) => Err(first_line(&e.render().to_string())),
        }
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:13000".parse().unwrap());
        assert_eq!(
            (c.brokers.as_str(), c.topic.as_str()),
            ("127.0.0.1:9092", "xtcp")
        );
        assert_eq!(c.compression, Compression::Lz4);
        assert_eq!(c.linger, Duration::from_millis(20));
        assert_eq!(c.prom_listen, Some("127.0.0.1:9001".parse().unwrap()));
        assert_eq!(parse(&["--no-prom"]).unwrap().prom_listen, None);
        assert_eq!(parse(&["--linger", "0ms"]).unwrap().linger, Duration::ZERO);
        assert_eq!(c.spool, None);
        assert_eq!(
            parse(&["--spool-dir", "/var/spool/x"]).unwrap().spool,
            Some(SpoolConfig {
                dir: "/var/spool/x".into(),
                bytes: 1 << 30
            })
        );
    }

    /// What the shipped environment file and spool drop-in set: each a
    /// flag's variable, with a value the flag takes.
    #[test]
    fn the_shipped_variables_are_flags_with_values_they_take() {
        let shipped = [
            include_str!("../../../bundle/systemd/forwarder.env"),
            include_str!("../../../bundle/systemd/spool.conf"),
        ];
        let command = Cli::command();
        let mut seen = 0;
        for line in shipped.iter().flat_map(|text| text.lines()) {
            let line = line.strip_prefix("Environment=").unwrap_or(line);
            if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            let (key, value) = line.split_once('=').unwrap();
            let arg = command
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == key))
                .unwrap_or_else(|| panic!("{key} is no flag's variable"));
            let flag = format!("--{}", arg.get_long().unwrap());
            // systemd's specifier for the state directories' root.
            let value = value.replace("%S", "/var/lib");
            parse(&[&flag, &value]).unwrap_or_else(|e| panic!("{key}={value}: {e}"));
            seen += 1;
        }
        assert_eq!(seen, 7);
    }

    #[test]
    fn values_librdkafka_or_kafka_would_refuse_are_one_line_errors() {
        for (args, needle) in [
            (&["--brokers", "kafka"][..], "'kafka' is not HOST:PORT"),
            (
                &["--brokers", "a:9092,:9092"][..],
                "':9092' is not HOST:PORT",
            ),
            (&["--topic", "a/b"][..], "not a Kafka topic name"),
            (&["--topic", ".."][..], "not a Kafka topic name"),
            (&["--queue-messages", "0"][..], "outside 1..="),
            (&["--queue-kib", "4294967296"][..], "outside 1..="),
            (&["--batch-bytes", "0"][..], "outside 1..="),
            (&["--delivery-timeout", "0s"][..], "longer than zero"),
            (&["--linger", "1h"][..], "librdkafka's 15m"),
            (&["--compression", "zip"][..], "--compression"),
            (&["--spool-bytes", "1000"][..], "outside 1048576..="),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(err.starts_with("error:"), "{args:?}: {err}");
        }
        assert_eq!(
            parse(&["--brokers", "b1:9092,[::1]:9093", "--topic", "xtcp.v1-a_b"])
                .unwrap()
                .topic,
            "xtcp.v1-a_b"
        );
    }
}
