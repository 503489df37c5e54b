//! `--print-config`: a [`Config`] as the `XTCP_*=value` lines of a systemd
//! `EnvironmentFile`, which parse back to the same [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use super::{
    Config, Family, DEFAULT_CLOSE_BUFFER, DEFAULT_PROM_LISTEN, DEFAULT_PROM_PATH,
    DEFAULT_SNAPSHOT_EVERY, DEFAULT_STATSD_DST,
};
use crate::filter::Filter;
use crate::wire::request::{AF_INET, AF_INET6, DEFAULT_STATES};
use crate::wire::state;

pub(super) fn states_to_string(mask: u32) -> String {
    if mask & DEFAULT_STATES == DEFAULT_STATES {
        let rest = state::names(mask & !DEFAULT_STATES);
        return std::iter::once("all")
            .chain(rest)
            .collect::<Vec<_>>()
            .join(",");
    }
    state::names(mask).collect::<Vec<_>>().join(",")
}

impl Config {
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
        // Blank for none.
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        };
        let a = &self.aggregation;
        let ports: Vec<String> = a.groups.ports.iter().map(u16::to_string).collect();
        let networks: Vec<String> = a
            .groups
            .networks
            .iter()
            .map(|n| format!("{}={}/{}", n.name, n.addr, n.len))
            .collect();
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
            ("CAPTURE", path(&self.capture)),
            ("CHANGES_ONLY", self.snapshot_every.is_some().to_string()),
            (
                "SNAPSHOT_EVERY",
                self.snapshot_every
                    .unwrap_or(DEFAULT_SNAPSHOT_EVERY)
                    .to_string(),
            ),
            ("PROCESSES", self.processes.to_string()),
            ("NO_CGROUP_PATHS", (!self.cgroups.enabled).to_string()),
            ("CGROUP_CACHE", self.cgroups.cache.to_string()),
            ("CGROUP_RESCAN", dur(self.cgroups.rescan)),
            ("NO_AGGREGATES", (!self.aggregation.enabled).to_string()),
            ("AGGREGATE_GROUPS", a.groups.groups.to_string()),
            ("AGGREGATE_TTL", a.groups.ttl.to_string()),
            ("AGGREGATE_PORTS", ports.join(",")),
            ("AGGREGATE_NETWORKS", networks.join(",")),
            (
                "OTLP_URL",
                a.otlp_url.as_ref().map_or(String::new(), |u| u.to_string()),
            ),
            ("OTLP_TIMEOUT", dur(a.otlp_timeout)),
            ("CLOSE_RECORDS", self.close_buffer.is_some().to_string()),
            (
                "CLOSE_BUFFER",
                self.close_buffer
                    .unwrap_or(DEFAULT_CLOSE_BUFFER as usize)
                    .to_string(),
            ),
            ("FEED_KEY", path(&self.feed_key)),
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
    use clap::CommandFactory;

    use super::super::flags::Cli;
    use super::super::tests::parse;
    use super::super::ArgsError;
    use super::*;

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
            "--aggregate-groups",
            "7",
            "--aggregate-ttl",
            "3",
            "--aggregate-ports",
            "5432,6379",
            "--aggregate-networks",
            "lan=10.0.0.0/8,v6=fd00::/8",
            "--otlp-url",
            "http://collector:4318/v1/metrics",
            "--otlp-timeout",
            "2s",
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
