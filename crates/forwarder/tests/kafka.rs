//! The whole path into Kafka, for real: a private namespace holding 5000
//! connections (10002 sockets), the exporter polling it, `xtcp-forwarder`,
//! a `tansu` broker (a Kafka-compatible broker, in-memory storage) and a
//! Kafka consumer in this test, all inside the namespace. Needs root,
//! `tansu` on the PATH and chdb (`make test` installs both).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use xtcp::export::record::SCHEMA_VERSION;
use xtcp_feed::auth::{FeedKey, MIN_KEY_LEN};
use xtcp_feed::proto::{Envelope, Record};
use xtcp_testkit::harness::*;
use xtcp_testkit::Netns;

#[path = "kafka/spool.rs"]
mod spool;

const BROKER_PORT: u16 = 9092;
const TOPIC: &str = "xtcp";
const UDP_PORT: u16 = 13000;
/// The forwarder's metrics listener (its default).
const FORWARDER_PROM_PORT: u32 = 9001;

/// A tansu broker inside the namespace, with the topic created.
fn start_broker(ns: &Netns) -> Running {
    let url = format!("tcp://127.0.0.1:{BROKER_PORT}");
    let broker = Running(Some(
        Command::new("ip")
            .args(["netns", "exec", ns.name(), "tansu", "broker"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu (cargo install --locked tansu --features dynostore)"),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_ns(ns, || {
        TcpStream::connect((Ipv4Addr::LOCALHOST, BROKER_PORT))
    })
    .is_err()
    {
        assert!(Instant::now() < deadline, "tansu did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let created = Command::new("ip")
        .args(["netns", "exec", ns.name(), "tansu", "topic", "create"])
        .args(["--broker", &url, TOPIC])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "topic create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    broker
}

/// `xtcp-forwarder` in the namespace, from the exporter's default port to
/// the broker.
fn start_forwarder(farm: &Farm, extra: &[&str]) -> Running {
    let brokers = format!("127.0.0.1:{BROKER_PORT}");
    let mut args = vec!["--brokers", &brokers, "--topic", TOPIC, "--linger", "5ms"];
    args.extend_from_slice(extra);
    let running = Running(Some(
        farm.exec(workspace_bin("xtcp-forwarder"), &args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let bound = format!(":{UDP_PORT:04X} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_ns(&farm.ns, || {
        std::fs::read_to_string("/proc/thread-self/net/udp").unwrap()
    })
    .contains(&bound)
    {
        assert!(Instant::now() < deadline, "forwarder did not bind");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

/// Reads the topic from the beginning until `want(records so far)` or the
/// deadline; returns every record of every message, and each message's
/// payload (length-delimited records).
fn consume(
    ns: &Netns,
    deadline: Duration,
    want: impl Fn(&[Record]) -> bool + Sync,
) -> (Vec<Record>, Vec<Vec<u8>>) {
    in_ns(ns, || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{BROKER_PORT}"))
            .set("group.id", "xtcp-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(TOPIC), Duration::from_secs(10))
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            assignment
                .add_partition_offset(TOPIC, partition.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let end = Instant::now() + deadline;
        let (mut records, mut payloads) = (Vec::new(), Vec::new());
        while !want(&records) && Instant::now() < end {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let mut payload = message.payload().unwrap_or_default();
                    payloads.push(payload.to_vec());
                    while !payload.is_empty() {
                        records.push(
                            Record::decode_length_delimited(&mut payload)
                                .expect("length-delimited records"),
                        );
                    }
                }
                Some(Err(e)) => xtcp_service::say!("consumer: {e}"),
                None => {}
            }
        }
        (records, payloads)
    })
}

/// Polls in which every socket of the farm arrived.
fn whole_polls(records: &[Record], farm: &BTreeSet<Key>) -> BTreeSet<u64> {
    by_poll(records)
        .into_iter()
        .filter(|(_, rs)| {
            let keys: BTreeSet<Key> = rs.iter().map(|r| key(r)).collect();
            keys.is_superset(farm)
        })
        .map(|(poll, _)| poll)
        .collect()
}

/// The value after `name` in the forwarder's exit line.
/// An envelope of `records` minimal records numbered after `after`.
fn envelope(after: u64, records: u64) -> Vec<u8> {
    Envelope {
        records: (1..=records)
            .map(|i| Record {
                schema_version: 1,
                record_counter: after + i,
                ..Default::default()
            })
            .collect(),
        watermark: None,
    }
    .encode_to_vec()
}

fn forwarder_total(stderr: &str, name: &str) -> u64 {
    stopped_value(stderr, "xtcp-forwarder", "", name)
}

/// The records of one exporter run.
fn of_instance(records: &[Record], instance: u64) -> Vec<Record> {
    records
        .iter()
        .filter(|r| r.instance == instance)
        .cloned()
        .collect()
}

/// Two exporter runs on one host (same hostname, same day): every record of
/// both reaches Kafka and lands in ClickHouse as its own row.
#[test]
fn every_record_reaches_kafka_intact() {
    let Some(farm) = Farm::needing("kafka", &[Need::Tool("tansu"), Need::Python("chdb")]) else {
        return;
    };
    let _broker = start_broker(&farm.ns);
    let forwarder = start_forwarder(&farm, &[]);
    let (_, first) = run(farm.xtcp(&["--max-loops", "2", "--frequency", "300ms"]));
    let (_, second) = run(farm.xtcp(&["--max-loops", "1"]));
    let runs = [
        (total(&first, "", "instance"), 2),
        (total(&second, "", "instance"), 1),
    ];
    assert_ne!(runs[0].0, runs[1].0, "each run draws its own instance");
    let (records, messages) = consume(&farm.ns, Duration::from_secs(60), |r| {
        runs.iter().all(|&(instance, polls)| {
            whole_polls(&of_instance(r, instance), &farm.keys).len() == polls
        })
    });
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");

    for (instance, polls) in runs {
        assert_run_whole(&of_instance(&records, instance), polls, &farm.keys);
    }
    // Everything the exporters sent was received, produced and acknowledged.
    let sent: u64 = [&first, &second]
        .iter()
        .map(|run| dumps_total(run, "records"))
        .sum();
    assert_eq!(records.len() as u64, sent);
    assert_eq!(forwarder_total(&stderr, "records"), sent, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "delivered_records"), sent);
    assert_eq!(forwarder_total(&stderr, "dropped_records"), 0);
    assert_eq!(forwarder_total(&stderr, "malformed"), 0);

    assert_lands_in_clickhouse(&messages, &records);
}

/// One run's records: `polls` polls, each with every farm socket once and
/// nothing else but the broker's and the forwarder's sockets; numbered 1..=n.
fn assert_run_whole(records: &[Record], polls: usize, farm: &BTreeSet<Key>) {
    let by_id = by_poll(records);
    assert_eq!(
        by_id.keys().copied().collect::<Vec<_>>(),
        (1..=polls as u64).collect::<Vec<_>>()
    );
    let hostname = nix::unistd::gethostname().unwrap();
    for (poll, records) in &by_id {
        // The farm's sockets, each once; the rest are the broker's and the
        // forwarder's own, in the same namespace.
        let (farm_records, others): (Vec<&&Record>, Vec<&&Record>) =
            records.iter().partition(|r| farm.contains(&key(r)));
        let keys: BTreeSet<Key> = farm_records.iter().map(|r| key(r)).collect();
        assert_eq!(farm_records.len(), farm.len(), "poll {poll}: records");
        assert_eq!(&keys, farm, "poll {poll}: sockets");
        for r in &others {
            let ports = [
                r.inet_diag_msg_socket_source_port,
                r.inet_diag_msg_socket_destination_port,
            ];
            assert!(
                ports.contains(&u32::from(BROKER_PORT)) || ports.contains(&FORWARDER_PROM_PORT),
                "a socket of nobody known: {r:?}"
            );
        }
        for r in &farm_records {
            assert_eq!(r.hostname, hostname.to_string_lossy());
            assert_eq!(r.schema_version, SCHEMA_VERSION);
            assert_eq!(r.tcp_info_state, Some(r.inet_diag_msg_state), "{r:?}");
            assert!(!r.congestion_algorithm_string.is_empty());
        }
    }
    let mut counters: Vec<u64> = records.iter().map(|r| r.record_counter).collect();
    counters.sort_unstable();
    assert_eq!(counters, (1..=records.len() as u64).collect::<Vec<_>>());
}

/// Runs the consumed messages, the first of them twice (an at-least-once
/// redelivery), through the ClickHouse DDL of docs/kafka.md
/// (`tools/clickhouse/check.py`, chdb, which merges with `OPTIMIZE ...
/// FINAL`) and compares what landed with the records decoded here.
fn assert_lands_in_clickhouse(messages: &[Vec<u8>], records: &[Record]) {
    let mut payloads = messages.concat();
    payloads.extend_from_slice(&messages[0]);
    let stdout = clickhouse_check(&[], &payloads);
    let landed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let n = records.len() as u64;
    let count = |family| {
        records
            .iter()
            .filter(|r| r.inet_diag_msg_family == family)
            .count()
    };
    // Every record once: the redelivered message merged away, the two runs'
    // equal (hostname, record_counter) pairs kept apart by the instance.
    assert_eq!(landed["rows"], n, "{landed}");
    assert_eq!(landed["unique_records"], n);
    assert_eq!(landed["instances"], 2);
    let hostname_and_counter: BTreeSet<u64> = records.iter().map(|r| r.record_counter).collect();
    assert!(
        hostname_and_counter.len() < records.len(),
        "the runs share numbers"
    );
    assert_eq!(landed["min_counter"], 1);
    assert_eq!(
        landed["max_counter"],
        hostname_and_counter.last().copied().unwrap()
    );
    assert_eq!(landed["v4"], count(u32::from(xtcp::wire::request::AF_INET)));
    assert_eq!(
        landed["v6"],
        count(u32::from(xtcp::wire::request::AF_INET6))
    );
    let without_rtt = records.iter().filter(|r| r.tcp_info_rtt.is_none()).count();
    assert_eq!(landed["without_rtt"], without_rtt);
    let strings = |key: &str| -> BTreeSet<String> {
        landed[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let source_ips: BTreeSet<String> = records
        .iter()
        .map(|r| match r.inet_diag_msg_socket_source.len() {
            4 => <[u8; 4]>::try_from(&r.inet_diag_msg_socket_source[..])
                .map(|a| std::net::Ipv4Addr::from(a).to_string())
                .unwrap(),
            _ => <[u8; 16]>::try_from(&r.inet_diag_msg_socket_source[..])
                .map(|a| std::net::Ipv6Addr::from(a).to_string())
                .unwrap(),
        })
        .collect();
    assert!(source_ips.contains("127.0.0.1") && source_ips.contains("::1"));
    assert_eq!(strings("source_ips"), source_ips);
    let hostnames: BTreeSet<String> = records.iter().map(|r| r.hostname.clone()).collect();
    assert_eq!(strings("hostnames"), hostnames);
    let algorithms: BTreeSet<String> = records
        .iter()
        .map(|r| r.congestion_algorithm_enum().as_str_name().to_string())
        .collect();
    assert_eq!(strings("algorithms"), algorithms);
}

#[test]
fn a_broker_outage_is_survived_and_every_record_accounted_for() {
    let Some(farm) = Farm::needing("outage", &[Need::Tool("tansu")]) else {
        return;
    };
    let broker = start_broker(&farm.ns);
    let forwarder = start_forwarder(&farm, &["--delivery-timeout", "4s"]);
    let exporter = Running(Some(
        // A poll every 2 s: time for the consumer to keep up.
        farm.xtcp(&["--frequency", "2s"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    // Two whole polls delivered, then the broker dies.
    let (before, _) = consume(&farm.ns, Duration::from_secs(60), |r| {
        whole_polls(r, &farm.keys).len() >= 2
    });
    let delivered_before = whole_polls(&before, &farm.keys);
    assert!(delivered_before.len() >= 2, "{delivered_before:?}");
    drop(broker); // SIGKILL: no goodbye to the clients
    std::thread::sleep(Duration::from_secs(3));
    // A new broker (empty: in-memory storage) on the same address.
    let _broker = start_broker(&farm.ns);
    let last_before = by_poll(&before).keys().copied().max().unwrap();
    let (after, _) = consume(&farm.ns, Duration::from_secs(60), |r| {
        whole_polls(r, &farm.keys).last() > Some(&(last_before + 1))
    });
    let delivered_after = whole_polls(&after, &farm.keys);
    let (status, exporter) = exporter.terminate();
    let (forwarder_status, stderr) = forwarder.terminate();
    assert!(
        delivered_after.last() > Some(&(last_before + 1)),
        "no whole poll after the broker came back: {delivered_after:?}\n{stderr}"
    );
    assert!(status.success(), "{exporter}");
    assert!(forwarder_status.success(), "{stderr}");
    // Every record received is delivered or counted as dropped.
    let received = forwarder_total(&stderr, "records");
    let delivered = forwarder_total(&stderr, "delivered_records");
    let dropped = forwarder_total(&stderr, "dropped_records");
    assert_eq!(received, delivered + dropped, "{stderr}");
    // Nothing was lost before the forwarder: it received every record sent.
    let sent = dumps_total(&exporter, "records");
    assert_eq!(received, sent, "{exporter}\n{stderr}");
    assert!(
        stderr.contains("kafka"),
        "the outage was reported: {stderr}"
    );
}

/// With no broker at all: a full queue drops (counted), garbage is counted
/// and not produced, and what is still queued at SIGTERM is counted as
/// dropped at shutdown once `--flush-timeout` runs out. The metrics say so
/// over HTTP first.
#[test]
fn without_a_broker_every_record_is_counted_as_dropped() {
    let Some(alone) = Alone::new("nobroker", &[]) else {
        return;
    };
    let forwarder = alone_forwarder(
        &alone,
        &[
            // Port 1: nothing listens, every connection is refused.
            "--brokers",
            "127.0.0.1:1",
            "--queue-messages",
            "5",
            "--delivery-timeout",
            "1m",
            "--flush-timeout",
            "500ms",
        ],
    );
    let sender = alone.sender();
    let listen = ("127.0.0.1", UDP_PORT);
    // 20 datagrams of 3 records each, and one that is not xtcp.
    for n in 0..20u64 {
        sender.send_to(&envelope(n * 3, 3), listen).unwrap();
    }
    sender.send_to(b"\x0a\xffnot xtcp", listen).unwrap();
    // Well framed, but its one record is not protobuf: refused too.
    sender.send_to(b"\x0a\x02\xff\xff", listen).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let body = scrape(&alone.ns, FORWARDER_PROM_PORT as u16);
        if body.contains("xtcp_forwarder_datagrams_total 22") {
            break body;
        }
        assert!(Instant::now() < deadline, "datagrams not counted:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for reason in ["framing", "undecodable"] {
        let series = format!("xtcp_forwarder_malformed_datagrams_total{{reason=\"{reason}\"}} 1");
        assert!(scrape.contains(&series), "{scrape}");
    }
    assert!(scrape.contains("xtcp_forwarder_records_total 60"));
    assert!(
        scrape.contains("xtcp_forwarder_queued_messages 5"),
        "{scrape}"
    );
    assert!(
        scrape.contains("xtcp_forwarder_dropped_records_total{reason=\"queue_full\"} 45"),
        "{scrape}"
    );
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("5 messages still queued"), "{stderr}");
    assert!(
        stderr.contains("dropped a datagram: not an xtcp"),
        "{stderr}"
    );
    assert_eq!(forwarder_total(&stderr, "datagrams"), 22);
    assert_eq!(forwarder_total(&stderr, "malformed"), 2);
    assert_eq!(forwarder_total(&stderr, "records"), 60);
    assert_eq!(forwarder_total(&stderr, "delivered_records"), 0);
    assert_eq!(forwarder_total(&stderr, "dropped_records"), 60, "{stderr}");
}

/// The forwarder alone in a namespace, receiving on `UDP_PORT` (metrics on
/// `FORWARDER_PROM_PORT` unless `args` say `--no-prom`), once bound.
fn alone_forwarder(alone: &Alone, args: &[&str]) -> Running {
    let mut forwarder = Running(Some(
        alone
            .exec(workspace_bin("xtcp-forwarder"), args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    alone.wait_bound(UDP_PORT, &mut forwarder);
    forwarder
}

#[test]
fn forwarder_bad_flags_and_taken_ports_are_one_line_errors() {
    let forwarder = |args: &[&str]| {
        let mut cmd = Command::new(workspace_bin("xtcp-forwarder"));
        cmd.args(args);
        one_line_exit(cmd)
    };
    let (code, stderr) = forwarder(&["--compression", "zip"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--compression"), "{stderr}");
    let (code, stderr) = forwarder(&["--linger", "soon"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--linger"), "{stderr}");
    let Some(alone) = Alone::new("taken", &[]) else {
        return;
    };
    let _taken = in_ns(&alone.ns, || {
        std::net::UdpSocket::bind(("127.0.0.1", UDP_PORT)).unwrap()
    });
    let listen = format!("127.0.0.1:{UDP_PORT}");
    let (code, stderr) = one_line_exit(alone.exec(
        workspace_bin("xtcp-forwarder"),
        &["--listen", &listen, "--no-prom"],
    ));
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "error: binding --listen {listen}: Address already in use"
        )),
        "{stderr}"
    );
}

/// SIGTERM while datagrams wait on the forwarder's socket: they are
/// forwarded before it stops (here, with no broker, produced and then
/// dropped at shutdown), and the exit line balances: datagrams = malformed
/// + produced + refused.
#[test]
fn sigterm_forwards_what_is_queued_and_the_totals_balance() {
    let Some(alone) = Alone::new("sigterm", &[]) else {
        return;
    };
    let listen = format!("127.0.0.1:{UDP_PORT}");
    let mut forwarder = alone_forwarder(
        &alone,
        &[
            "--brokers",
            "127.0.0.1:1",
            "--no-prom",
            "--flush-timeout",
            "500ms",
        ],
    );
    let pid = Pid::from_raw(forwarder.child().id() as i32);
    // Stopped, it reads nothing: the datagrams wait on its socket, and so
    // does the SIGTERM.
    kill(pid, Signal::SIGSTOP).unwrap();
    let sender = alone.sender();
    for n in 0..50u64 {
        sender.send_to(&envelope(n * 2, 2), &listen).unwrap();
    }
    sender.send_to(b"\x0a\x00", &listen).unwrap();
    kill(pid, Signal::SIGTERM).unwrap();
    kill(pid, Signal::SIGCONT).unwrap();
    let mut stderr_pipe = forwarder.child().stderr.take().unwrap();
    let status = forwarder.wait_at_most(Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut stderr_pipe, &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(forwarder_total(&stderr, "datagrams"), 51, "{stderr}");
    assert_eq!(
        forwarder_total(&stderr, "malformed"),
        1,
        "no_schema: {stderr}"
    );
    assert_eq!(forwarder_total(&stderr, "produced"), 50, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "refused"), 0, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "records"), 100, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "dropped_records"), 100, "{stderr}");
}

/// Driven into kernel drops (a small buffer, stopped during a burst, the
/// last datagrams dropped too), the forwarder counts as lost exactly the
/// records it did not receive, the tail from the run's stop watermark,
/// within its 5 s window and before it stops; its metrics show the
/// kernel's drops.
#[test]
fn the_forwarder_counts_exactly_what_the_kernel_dropped() {
    let Some(alone) = Alone::new("fwddrops", &[]) else {
        return;
    };
    let mut forwarder = alone_forwarder(
        &alone,
        &[
            "--brokers",
            "127.0.0.1:1",
            "--recv-buffer",
            "4096",
            "--flush-timeout",
            "0s",
        ],
    );
    scrape(&alone.ns, FORWARDER_PROM_PORT as u16); // serving, so bound
    let pid = forwarder.child().id();
    let (datagrams, per) = (400, 5);
    let sent = overflow_receiver(&alone, pid, UDP_PORT, 0xfeed, datagrams, per);
    // The drop counter is read every second, holes are lost after 5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let scraped = loop {
        let body = scrape(&alone.ns, FORWARDER_PROM_PORT as u16);
        let got = |name| metric::<u64>(&body, name).unwrap_or(0);
        let accounted =
            got("xtcp_forwarder_records_total") + got("xtcp_forwarder_records_lost_total");
        if accounted == sent && got("xtcp_forwarder_kernel_drops_total") > 0 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the loss was not counted:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let drops = metric::<u64>(&scraped, "xtcp_forwarder_kernel_drops_total").unwrap();
    assert_eq!(
        metric::<u64>(&scraped, "xtcp_forwarder_runs_stopped_total"),
        Some(1)
    );
    assert_eq!(
        metric::<u64>(&scraped, "xtcp_forwarder_watermarks_total"),
        Some(1)
    );
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    let received = forwarder_total(&stderr, "records");
    assert!(received < sent / 2, "no overflow: {stderr}");
    xtcp_service::say!(
        "forwarder: sent {sent} received {received} lost {} kernel_drops {} (x{per} records)",
        forwarder_total(&stderr, "lost"),
        forwarder_total(&stderr, "kernel_drops")
    );
    assert_eq!(
        forwarder_total(&stderr, "lost"),
        sent - received,
        "{stderr}"
    );
    assert_eq!(forwarder_total(&stderr, "kernel_drops"), drops, "{stderr}");
    assert_eq!(drops * per, sent - received, "{stderr}");
}

/// A run that stops talking without its stop watermark falls silent after
/// three of its poll intervals (at least 5 s): the forwarder says so once
/// and counts it; heard again, it is live again.
#[test]
fn a_run_that_stops_talking_is_counted_silent() {
    let Some(alone) = Alone::new("fwdsilent", &[]) else {
        return;
    };
    let forwarder = alone_forwarder(
        &alone,
        &["--brokers", "127.0.0.1:1", "--flush-timeout", "0s"],
    );
    let sender = alone.sender();
    let listen = ("127.0.0.1", UDP_PORT);
    sender
        .send_to(&numbered_envelope(0xd1e, 1, 3), listen)
        .unwrap();
    let mark = watermark_datagram(0xd1e, 1, 3, false, Duration::from_millis(100));
    sender.send_to(&mark, listen).unwrap();
    let silent = |body: &str| {
        (
            metric::<u64>(body, "xtcp_forwarder_runs_silent"),
            metric::<u64>(body, "xtcp_forwarder_runs_silent_total"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let body = scrape(&alone.ns, FORWARDER_PROM_PORT as u16);
        if silent(&body) == (Some(1), Some(1)) {
            break body;
        }
        assert!(Instant::now() < deadline, "not silent:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        metric::<u64>(&body, "xtcp_forwarder_runs_heard_total"),
        Some(1)
    );
    assert_eq!(
        metric::<u64>(&body, "xtcp_forwarder_records_lost_total"),
        Some(0)
    );
    // Its next poll: live again, still counted once.
    sender
        .send_to(&numbered_envelope(0xd1e, 4, 3), listen)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while silent(&scrape(&alone.ns, FORWARDER_PROM_PORT as u16)) != (Some(0), Some(1)) {
        assert!(Instant::now() < deadline, "still silent");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("run 3358 of burst fell silent"), "{stderr}");
    assert_eq!(forwarder_total(&stderr, "runs_silent"), 1, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "lost"), 0, "{stderr}");
}

/// With keys, the forwarder passes on only datagrams signed with one of
/// them: forged, other-key and unsigned ones are dropped and counted.
#[test]
fn with_feed_keys_only_signed_datagrams_are_forwarded() {
    let Some(alone) = Alone::new("fwdkeys", &[]) else {
        return;
    };
    let (current, next, other) = (
        key_file("a", &[1; MIN_KEY_LEN]),
        key_file("b", &[2; MIN_KEY_LEN]),
        key_file("c", &[3; MIN_KEY_LEN]),
    );
    let keys = |path: &std::path::Path| FeedKey::load(path).unwrap();
    let forwarder = Running(Some(
        alone
            .exec(
                workspace_bin("xtcp-forwarder"),
                &[
                    "--no-prom",
                    "--brokers",
                    "127.0.0.1:1",
                    "--flush-timeout",
                    "0s",
                ],
            )
            .args(["--feed-key".as_ref(), current.as_os_str()])
            .args(["--feed-key".as_ref(), next.as_os_str()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut forwarder = forwarder;
    alone.wait_bound(UDP_PORT, &mut forwarder);
    let sender = alone.sender();
    let signed = |key: &std::path::Path, first| {
        let mut datagram = numbered_envelope(7, first, 3);
        keys(key).sign(&mut datagram);
        datagram
    };
    // Either key of a rotation passes.
    let good = [signed(&current, 1), signed(&next, 4)];
    // A record changed after signing (a forgery), a datagram signed with
    // a key the forwarder does not have, and one not signed at all.
    let mut forged = signed(&current, 7);
    forged[10] ^= 1;
    let bad = [forged, signed(&other, 7), numbered_envelope(7, 7, 3)];
    for datagram in good.iter().chain(&bad) {
        sender.send_to(datagram, ("127.0.0.1", UDP_PORT)).unwrap();
    }
    while alone.queued(UDP_PORT) != Some(0) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(forwarder_total(&stderr, "datagrams"), 5, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "unauthenticated"), 3, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "malformed"), 0, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "records"), 6, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "produced"), 2, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "lost"), 0, "{stderr}");
    for path in [current, next, other] {
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn an_unprivileged_forwarder_says_its_receive_buffer_is_short() {
    let Some(alone) = Alone::new("fwdunpriv", &[Need::Tool("setpriv")]) else {
        return;
    };
    let asked: usize = 512 << 20;
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(rmem_max < asked, "rmem_max {rmem_max} would grant it");
    let mut forwarder = Running(Some(
        alone
            .exec(
                "setpriv",
                &[
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                ],
            )
            .arg(workspace_bin("xtcp-forwarder"))
            .args(["--brokers", "127.0.0.1:1"])
            .args(["--recv-buffer", &asked.to_string(), "--flush-timeout", "0s"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    alone.wait_bound(UDP_PORT, &mut forwarder);
    let scrape = scrape(&alone.ns, FORWARDER_PROM_PORT as u16);
    let granted = scrape
        .lines()
        .find_map(|l| l.strip_prefix("xtcp_forwarder_receive_buffer_bytes "))
        .unwrap_or_else(|| panic!("{scrape}"));
    assert_eq!(granted.parse::<usize>().unwrap(), rmem_max, "{scrape}");
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    let said = format!("warning: UDP receive buffer is {rmem_max} bytes, not the {asked} asked");
    assert!(stderr.contains(&said), "{stderr}");
}
