//! Command line (and `XTCP_*` environment variables) -> validated [`Config`].
//!
//! Parsed once in `main`. A bad value exits 2 with one line naming the flag
//! and what was wrong.

use std::ffi::OsString;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

use crate::wire::request::{AF_INET, AF_INET6, ALL_EXTENSIONS, ALL_STATES};

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// One JSON object per line on standard output.
    Stdout,
}

impl FromStr for Dest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Dest::Stdout),
            other => Err(format!("unknown destination '{other}' (supported: stdout)")),
        }
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dest::Stdout => f.write_str("stdout"),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("'{s}': {e} (e.g. 30s, 500ms, 1m)"))?;
    if d.is_zero() {
        return Err(format!("'{s}' must be longer than zero"));
    }
    Ok(d)
}

/// xtcp: export every TCP socket of this host (netlink sock_diag) as records.
#[derive(Debug, Parser)]
#[command(name = "xtcp", version, about, long_about = None)]
struct Cli {
    /// Number of polls to run, then exit; 0 polls until stopped.
    #[arg(long, env = "XTCP_MAX_LOOPS", default_value_t = 0)]
    max_loops: u64,

    /// Time from one poll's start to the next (e.g. 30s, 500ms, 1m).
    #[arg(long, env = "XTCP_FREQUENCY", default_value = "30s", value_parser = parse_duration)]
    frequency: Duration,

    /// Give up on a dump when the kernel sends nothing for this long.
    #[arg(long, env = "XTCP_NETLINK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    netlink_timeout: Duration,

    /// Where records go: stdout (JSON lines).
    #[arg(long, env = "XTCP_DEST", default_value = "stdout")]
    dest: Dest,

    /// Do not poll IPv4 sockets.
    #[arg(long, env = "XTCP_NO4")]
    no4: bool,

    /// Do not poll IPv6 sockets.
    #[arg(long, env = "XTCP_NO6")]
    no6: bool,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub max_loops: u64,
    pub frequency: Duration,
    pub netlink_timeout: Duration,
    pub dest: Dest,
    /// Address families to dump, in order.
    pub families: Vec<u8>,
    pub states: u32,
    pub extensions: u8,
}

/// A command line that cannot run, or a request for help/version text.
#[derive(Debug)]
pub enum ArgsError {
    /// `--help` / `--version`: print and exit 0.
    Info(clap::Error),
    /// Exit 2 with this one line.
    Invalid(String),
}

impl Config {
    pub fn from_args<I, T>(args: I) -> Result<Config, ArgsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                ArgsError::Info(e)
            }
            _ => ArgsError::Invalid(first_line(&e.render().to_string())),
        })?;
        let families: Vec<u8> = [
            (!cli.no4).then_some(AF_INET),
            (!cli.no6).then_some(AF_INET6),
        ]
        .into_iter()
        .flatten()
        .collect();
        if families.is_empty() {
            return Err(ArgsError::Invalid(
                "error: --no4 and --no6 together leave nothing to poll".into(),
            ));
        }
        Ok(Config {
            max_loops: cli.max_loops,
            frequency: cli.frequency,
            netlink_timeout: cli.netlink_timeout,
            dest: cli.dest,
            families,
            states: ALL_STATES,
            extensions: ALL_EXTENSIONS,
        })
    }
}

/// clap renders usage and a help hint after the error; operators get one line.
fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::from_args(std::iter::once("xtcp").chain(args.iter().copied())).map_err(
            |e| match e {
                ArgsError::Invalid(line) => line,
                ArgsError::Info(e) => e.to_string(),
            },
        )
    }

    #[test]
    fn defaults_poll_both_families_every_30s_forever() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.families, vec![AF_INET, AF_INET6]);
        assert_eq!(c.frequency, Duration::from_secs(30));
        assert_eq!(c.max_loops, 0);
        assert_eq!(c.dest, Dest::Stdout);
        assert_eq!(c.states, ALL_STATES);
    }

    #[test]
    fn one_shot() {
        let c = parse(&["--max-loops", "1", "--dest", "stdout", "--no6"]).unwrap();
        assert_eq!((c.max_loops, c.families.as_slice()), (1, &[AF_INET][..]));
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        for (args, needle) in [
            (&["--frequency", "0s"][..], "longer than zero"),
            (&["--frequency", "soon"][..], "--frequency"),
            (&["--dest", "kafka"][..], "unknown destination 'kafka'"),
            (&["--max-loops", "x"][..], "--max-loops"),
            (&["--no4", "--no6"][..], "nothing to poll"),
            (&["--bogus"][..], "--bogus"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains('\n'), "{args:?}: {err:?}");
        }
    }
}
