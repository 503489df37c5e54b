//! The command line checked and resolved into a [`Config`]: flags that
//! contradict each other, sizes out of range, blanks from an environment
//! file.

use super::flags::Cli;
use super::{
    Aggregation, CgroupPaths, Config, Dest, Family, NetnsSelection, OutputFormat, PromEndpoint,
};
use crate::aggregate::AggregateConfig;
use crate::wire::request::{AF_INET, AF_INET6, ALL_EXTENSIONS};

/// Smallest receive buffer on a kernel with `page`-byte pages: the kernel
/// fills a dump datagram up to `NLMSG_GOODSIZE` (one page, at most 8 KiB,
/// less its bookkeeping) even when the reader offers less, so a 64 KiB-page
/// kernel needs 8 KiB where a 4 KiB-page one needs 4 KiB.
pub(super) fn min_recv_buffer(page: usize) -> usize {
    page.clamp(4096, 8192)
}
/// Largest receive buffer accepted. A dump datagram is at most
/// [`DUMP_DATAGRAM_MAX`](crate::pipeline::sock_diag::DUMP_DATAGRAM_MAX)
/// bytes, which the default (8 pages of 4 KiB) is, so
/// more only wastes memory.
const MAX_RECV_BUFFER: usize = 1 << 20;

impl Config {
    pub(super) fn validate(cli: &Cli) -> Result<Config, String> {
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
        // Blank (`XTCP_OTLP_URL=`): none.
        let otlp_url = match cli.otlp_url.trim() {
            "" => None,
            url => Some(
                crate::aggregate::otlp::parse_url(url).map_err(|e| format!("--otlp-url {e}"))?,
            ),
        };
        let polls = !cli.once && cli.replay.is_none();
        let read = (!cli.no_prom && !cli.once) || otlp_url.is_some();
        let aggregation = Aggregation {
            enabled: !cli.no_aggregates && polls && read,
            groups: AggregateConfig {
                groups: cli.aggregate_groups as usize,
                ttl: cli.aggregate_ttl,
                ports: cli.aggregate_ports.0.clone(),
                networks: cli.aggregate_networks.0.clone(),
            },
            otlp_url,
            otlp_timeout: cli.otlp_timeout,
        };
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
            processes: cli.processes && cli.replay.is_none(),
            cgroups: CgroupPaths {
                enabled: !cli.no_cgroup_paths && cli.replay.is_none(),
                cache: cli.cgroup_cache as usize,
                rescan: cli.cgroup_rescan,
            },
            aggregation,
            prom: (!cli.no_prom && !cli.once).then(|| PromEndpoint {
                listen: cli.prom_listen,
                path: cli.prom_path.clone(),
            }),
            statsd: (!cli.no_statsd && !cli.once).then_some(cli.statsd_dst),
            verbose: cli.verbose,
        })
    }
}
