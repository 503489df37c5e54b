//! What a dump did, counted: the one table of the exporter's dump counters.
//!
//! Every counter is one entry of the table below, declared the way every
//! xtcp counter is ([`xtcp_service::counters`]): its field of
//! [`DumpTotals`] (and of [`DumpCounters`], the atomics the threads of a
//! dump add to), its `family`-labelled Prometheus series (and so its statsd
//! line), its exit-line key and its warning words. `docs/metrics.md` carries
//! the table the entries make; the tests in this module check that every
//! counter reaches each place it is shown.
//!
//! This module is below both `pipeline` (which counts) and `metrics` (which
//! shows), so neither imports the other.

use std::time::Duration;

use xtcp_service::counters::{Shared, Tally};

use crate::config::Family;

xtcp_service::counters! {
    /// What a dump did: a thread's tally, a dump's totals, or a sum of them.
    pub struct DumpTotals;
    "xtcp_sockets_skipped_total" shared "Sockets reported but not exported, by reason:";
    "xtcp_netlink_errors_total" shared "Netlink failures, by kind:";
    // Netlinkers.
    datagrams "Netlink reply datagrams received for the dumps." => "xtcp_netlink_datagrams_total";
    bytes "Bytes of those datagrams." => "xtcp_netlink_bytes_total";
    messages "Netlink messages in them: one per socket, plus NLMSG_DONE and any error." => "xtcp_netlink_messages_total";
    sockets "Sockets the kernel reported." => "xtcp_sockets_total", exit "sockets";
    // Inetdiagers.
    sampled "Sockets kept by --sampling-modulus." => "xtcp_sockets_sampled_total", exit "sampled";
    unsampled "left out by --sampling-modulus" => "xtcp_sockets_skipped_total" ["reason" = "sampling"];
    records "Records encoded and handed to the output." => "xtcp_records_total", exit "records";
    sent_datagrams "UDP datagrams sent (with --dest stdout: writes)." => "xtcp_output_datagrams_total", exit "sent_datagrams";
    sent_bytes "Bytes of those datagrams or writes." => "xtcp_output_bytes_total", exit "sent_bytes";
    send_errors "UDP sends that failed, e.g. nobody listening (ECONNREFUSED)." => "xtcp_output_send_errors_total", exit "send_errors", warn "failed sends";
    records_lost "Records in the datagrams whose send failed." => "xtcp_output_records_lost_total", exit "records_lost", warn "records lost in failed sends";
    decode_errors "a malformed socket message" => "xtcp_sockets_skipped_total" ["reason" = "undecodable"], exit "decode_errors", warn "socket messages not decodable";
    unchanged "not changed since its last export (--changes-only)" => "xtcp_sockets_skipped_total" ["reason" = "unchanged"], exit "unchanged";
    encode_errors "a record over the record buffer (never expected)" => "xtcp_sockets_skipped_total" ["reason" = "too_long"], warn "records too long for the record buffer";
    output_closed "stdout was closed or failed" => "xtcp_sockets_skipped_total" ["reason" = "output_closed"];
    unknown_attributes "Socket attributes of kinds this version does not decode: a newer kernel sends something new." => "xtcp_unknown_attributes_total";
    // The channel between them.
    channel_full "Times a netlinker found the channel to the inetdiagers full and waited (nothing is dropped; the kernel waits too)." => "xtcp_channel_full_total", exit "channel_full";
    channel_blocked_ns "Time netlinkers spent waiting on a full channel." => "xtcp_channel_blocked_seconds_total", unit Nanos, exit "channel_blocked_ms";
    // Failures of the dump itself.
    receive_errors "a datagram could not be received (lost)" => "xtcp_netlink_errors_total" ["kind" = "receive"], exit "netlink_errors", warn "netlink datagrams lost";
    malformed "a datagram could not be framed (lost)" => "xtcp_netlink_errors_total" ["kind" = "malformed"], exit "netlink_errors", warn "netlink datagrams lost";
    kernel_errors "the kernel ended a dump with an error" => "xtcp_netlink_errors_total" ["kind" = "kernel"], exit "netlink_errors", warn "kernel errors";
    request_errors "the dump request could not be sent" => "xtcp_netlink_errors_total" ["kind" = "request"], exit "netlink_errors", warn "requests not sent";
    timeouts "nothing came for --netlink-timeout while a netlinker was free to receive (waiting on a full channel does not count, nor waiting for its turn while another namespace's dump is read), and the dump was abandoned" => "xtcp_netlink_errors_total" ["kind" = "timeout"], exit "timeouts", warn "dumps abandoned (nothing received for --netlink-timeout)";
    interrupted "Dumps with a datagram flagged NLM_F_DUMP_INTR: the socket table changed under the dump, so a socket may be missing or repeated in that poll." => "xtcp_netlink_interrupted_dumps_total", unit Dumps, exit "interrupted", warn "datagrams flagged NLM_F_DUMP_INTR (sockets may be missing or repeated)";
}

/// What a dump did, counted by the threads that did it.
pub type DumpCounters = Shared<DumpTotals>;

xtcp_service::counters! {
    /// What the closer did (`--close-records`).
    pub struct CloseTotals;
    "xtcp_close_skipped_total" shared "Close messages not exported, by reason:";
    messages "Close messages the kernel sent, one per TCP socket destroyed in a polled namespace (--close-records)." => "xtcp_close_messages_total", exit "messages";
    records "Records made from them (record_kind closed)." => "xtcp_close_records_total", exit "records";
    unsampled "left out by --sampling-modulus" => "xtcp_close_skipped_total" ["reason" = "sampling"], exit "skipped";
    undecodable "a malformed close message" => "xtcp_close_skipped_total" ["reason" = "undecodable"], exit "skipped";
    too_long "a record over the record buffer (never expected)" => "xtcp_close_skipped_total" ["reason" = "too_long"], exit "skipped";
    output_closed "stdout was closed or failed" => "xtcp_close_skipped_total" ["reason" = "output_closed"], exit "skipped";
    lost "Close messages the kernel dropped because the closer's receive queue was full." => "xtcp_close_messages_lost_total", exit "lost";
    overruns "Times the closer found its queue had overflowed (ENOBUFS); each doubles the receive buffer, up to 64 MiB." => "xtcp_close_overruns_total", exit "overruns";
    send_errors "Datagrams of close records whose send failed." => "xtcp_close_send_errors_total", exit "send_errors";
    records_lost "Close records in those datagrams." => "xtcp_close_records_lost_total", exit "records_lost";
}

impl CloseTotals {
    /// What the closer counts of a batch of close messages that went
    /// through the inetdiager's record writer, which counted `tally`.
    pub fn of_written(tally: &DumpTotals) -> Self {
        CloseTotals {
            messages: tally.sampled + tally.unsampled,
            records: tally.records,
            unsampled: tally.unsampled,
            undecodable: tally.decode_errors,
            too_long: tally.encode_errors,
            output_closed: tally.output_closed,
            send_errors: tally.send_errors,
            records_lost: tally.records_lost,
            ..CloseTotals::default()
        }
    }
}

/// Sockets counted by the length of the `tcp_info` the kernel sent with
/// them. A kernel sends one length (its `sizeof(struct tcp_info)`), and none
/// for sockets without one (`TIME_WAIT`, `SYN_RECV`), so a few slots are
/// enough; lengths beyond them are counted together as `other`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfoLengths {
    /// `(key, sockets)`; key 0 is no `tcp_info`, otherwise length + 1.
    /// Slots with no sockets are free.
    slots: [(u32, u64); 4],
    other: u64,
}

impl TcpInfoLengths {
    /// Counts `n` sockets whose `tcp_info` was `len` bytes (`None`: absent).
    #[inline]
    pub fn add(&mut self, len: Option<usize>, n: u64) {
        let key = len.map_or(0, |l| l as u32 + 1);
        for slot in &mut self.slots {
            if slot.1 == 0 || slot.0 == key {
                *slot = (key, slot.1 + n);
                return;
            }
        }
        self.other += n;
    }

    pub fn merge(&mut self, other: &TcpInfoLengths) {
        for (len, n) in other.iter() {
            self.add(len, n);
        }
        self.other += other.other;
    }

    /// `(length, sockets)` per length seen; `None` is no `tcp_info`.
    pub fn iter(&self) -> impl Iterator<Item = (Option<usize>, u64)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.1 != 0)
            .map(|&(key, n)| ((key != 0).then(|| key as usize - 1), n))
    }

    /// Sockets whose length found no free slot.
    pub fn other(&self) -> u64 {
        self.other
    }
}

/// What the poller learns when a dump is finished.
#[derive(Debug, Clone)]
pub struct DumpReport {
    pub family: Family,
    /// The namespace dumped (0 in a sum over namespaces).
    pub netns_inode: u64,
    pub totals: DumpTotals,
    pub tcp_info_lengths: TcpInfoLengths,
    /// From the request to `NLMSG_DONE`; `None` if it never came.
    pub done_after: Option<Duration>,
    /// From the request to the last record sent.
    pub finished_after: Duration,
    /// Spent in the kernel's walk: in the request's `send` and the replies'
    /// `recv` (the clock of a dump waiting its turn does not run).
    pub kernel_time: Duration,
    /// The first problem of each kind, to say what went wrong.
    pub first_errors: Vec<String>,
}

impl DumpReport {
    /// A family's report of a poll that dumped no namespace yet.
    pub fn empty(family: Family) -> Self {
        DumpReport {
            family,
            netns_inode: 0,
            totals: DumpTotals::default(),
            tcp_info_lengths: TcpInfoLengths::default(),
            done_after: Some(Duration::ZERO),
            finished_after: Duration::ZERO,
            kernel_time: Duration::ZERO,
            first_errors: Vec::new(),
        }
    }

    /// Adds the dump of the same family in another namespace: times add up
    /// (with dumps side by side, to more than the poll took), and `NLMSG_DONE`
    /// counts as having come only if it came in every one.
    pub fn merge(&mut self, other: &DumpReport) {
        self.totals.add(&other.totals);
        self.tcp_info_lengths.merge(&other.tcp_info_lengths);
        self.done_after = self.done_after.zip(other.done_after).map(|(a, b)| a + b);
        self.finished_after += other.finished_after;
        self.kernel_time += other.kernel_time;
        self.first_errors.extend(other.first_errors.iter().cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::statsd::Statsd;
    use crate::metrics::tests::{family, metrics, pool, sample, scrape};
    use crate::metrics::Metrics;
    use crate::pipeline::report::{dump_warning, RunTotals};
    use crate::wire::request::AF_INET;
    use xtcp_service::counters::{undocumented, Table, Tally, Unit};

    const TABLE: Table = DumpTotals::TABLE;

    const GENERATED_START: &str = "<!-- generated from the counters! table of src/counting.rs";
    const GENERATED_END: &str = "<!-- end of the generated table -->";

    /// The rows `docs/metrics.md` has for the dump counters: one per metric.
    fn docs_table() -> String {
        let mut out = String::from(
            "| metric | type | labels | on the exit line | meaning |\n|---|---|---|---|---|\n",
        );
        for (metric, entries) in TABLE.metrics() {
            let labels: Vec<String> = std::iter::once("family")
                .chain(entries[0].label.map(|(l, _)| l))
                .map(|l| format!("`{l}`"))
                .collect();
            let mut exits: Vec<String> = Vec::new();
            for key in entries.iter().filter_map(|o| o.exit) {
                let key = format!("`{key}`");
                if !exits.contains(&key) {
                    exits.push(key);
                }
            }
            out.push_str(&format!(
                "| `{metric}` | counter | {} | {} | {} |\n",
                labels.join(", "),
                exits.join(", "),
                TABLE.metric_help(metric, |v| format!("`{v}`"))
            ));
        }
        out
    }

    /// `docs/metrics.md` carries the table the counters make; with
    /// `XTCP_BLESS=1` this test writes it there instead of failing.
    #[test]
    fn docs_list_every_counter_as_the_table_says() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let start = doc
            .find(GENERATED_START)
            .expect("the generated block's start");
        let body = start + doc[start..].find('\n').unwrap() + 1;
        let end = doc.find(GENERATED_END).expect("the generated block's end");
        let want = docs_table();
        if doc[body..end] != want {
            assert!(
                std::env::var_os("XTCP_BLESS").is_some(),
                "docs/metrics.md's counter table is not what src/counting.rs says; \
                 XTCP_BLESS=1 cargo test -p xtcp counting rewrites it"
            );
            std::fs::write(path, format!("{}{want}{}", &doc[..body], &doc[end..])).unwrap();
        }
    }

    /// Each counter, set alone to a distinct value in a poll's report,
    /// shows in Prometheus, statsd, the exit line and the warning its entry
    /// names, and docs/metrics.md describes its series.
    #[test]
    fn every_counter_reaches_every_place_it_is_shown() {
        let doc = include_str!("../docs/metrics.md");
        let missing = undocumented::<DumpTotals>(doc, &["family"]);
        assert!(missing.is_empty(), "docs/metrics.md lacks {missing:?}");
        let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for (i, counter) in TABLE.counters.iter().enumerate() {
            let metric = counter.metric.unwrap();
            // Nanoseconds: whole milliseconds on the exit line.
            let value = 3_000_000 + i as u64;
            let mut report = DumpReport::empty(family(AF_INET));
            report.totals.set(i, value);
            assert_eq!(
                report.totals.values().nth(i),
                Some(value),
                "{}",
                counter.name
            );
            assert_eq!(report.totals.values().sum::<u64>(), value);

            let m: Metrics = metrics();
            let mut statsd = Statsd::connect(
                listener.local_addr().unwrap(),
                m.table.statsd_errors.clone(),
            )
            .unwrap();
            m.observe_poll(std::slice::from_ref(&report), &[pool(0)], false);
            statsd.flush(m.registry());

            // Prometheus.
            let label = counter
                .label
                .map_or(String::new(), |(l, v)| format!(",{l}=\"{v}\""));
            let series = format!("{metric}{{family=\"v4\"{label}}}");
            let shown = counter.metric_value(value);
            assert_eq!(sample(&scrape(&m), &series), Some(shown), "{series}");

            // statsd: the metric without `xtcp_`, then the label values.
            let key = format!(
                "xtcp.{}.v4{}",
                metric.trim_start_matches("xtcp_"),
                counter
                    .label
                    .map_or(String::new(), |(_, v)| format!(".{v}"))
            );
            let mut lines = Vec::new();
            let mut buf = [0u8; 2048];
            while let Ok(n) = listener.recv(&mut buf) {
                lines.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string),
                );
            }
            assert!(
                lines.contains(&format!("{key}:{shown}|c")),
                "{key}:{shown}|c not in {lines:#?}"
            );

            // The exit line.
            let mut run = RunTotals::default();
            run.add_poll(std::slice::from_ref(&report), false);
            let line = run.to_string();
            if let Some(exit) = counter.exit {
                let shown = if counter.unit == Unit::Nanos {
                    value / 1_000_000
                } else {
                    value
                };
                assert!(line.contains(&format!(" {exit} {shown}")), "{line}");
            }

            // The warning.
            let warning = dump_warning(1, &report);
            match counter.warning {
                Some(words) => {
                    let warning = warning.unwrap_or_default();
                    assert!(warning.contains(&format!("{value} {words}")), "{warning}");
                }
                None => assert_eq!(warning, None, "{}", counter.name),
            }
        }
    }

    #[test]
    fn reports_of_namespaces_add_up() {
        let family = Family {
            af: AF_INET,
            netlinkers: 1,
            inetdiagers: 1,
        };
        let dump = |sockets, done_ms: Option<u64>| DumpReport {
            totals: DumpTotals {
                sockets,
                ..Default::default()
            },
            done_after: done_ms.map(Duration::from_millis),
            finished_after: Duration::from_millis(10),
            first_errors: vec![format!("e{sockets}")],
            ..DumpReport::empty(family)
        };
        let mut poll = DumpReport::empty(family);
        poll.merge(&dump(3, Some(4)));
        poll.merge(&dump(5, Some(6)));
        assert_eq!(poll.totals.sockets, 8);
        assert_eq!(poll.done_after, Some(Duration::from_millis(10)));
        assert_eq!(poll.finished_after, Duration::from_millis(20));
        assert_eq!(poll.first_errors, ["e3", "e5"]);
        // One namespace without NLMSG_DONE: the poll's dump never finished.
        poll.merge(&dump(1, None));
        assert_eq!(poll.done_after, None);
    }

    #[test]
    fn tcp_info_lengths_fill_slots_then_other() {
        let mut a = TcpInfoLengths::default();
        a.add(Some(280), 3);
        a.add(None, 2);
        a.add(Some(280), 1);
        assert_eq!(a.iter().collect::<Vec<_>>(), [(Some(280), 4), (None, 2)]);
        let mut b = TcpInfoLengths::default();
        for len in [0, 104, 232, 248, 256] {
            b.add(Some(len), 1);
        }
        a.merge(&b);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [(Some(280), 4), (None, 2), (Some(0), 1), (Some(104), 1)]
        );
        assert_eq!(a.other(), 3, "232, 248 and 256 found no slot");
    }
}
