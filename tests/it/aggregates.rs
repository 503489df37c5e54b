//! Per-service aggregates against the records of the same run. Two
//! services, each a helper process in a cgroup of its own (named like a
//! systemd service), hold connections in one namespace: one sends data
//! through a loopback that drops a tenth of its packets (a `tc` filter on
//! `clsact` ingress: dropping on the way in is what makes TCP
//! retransmit), the other stays idle. The exporter runs in the host's
//! namespaces (where it sees the cgroup2 mount) and polls theirs.
//!
//! Every number the metrics endpoint says of the two services is computed
//! again from the records (the same `tcp_info` bytes): connections by state
//! exact, histogram counts equal to connections times polls, counters equal
//! to the sum of each connection's change since the first poll; the OTLP
//! push of the same poll, decoded with the official definitions, says the
//! same.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use xtcp_feed::proto::Record;
use xtcp_testkit::Netns;

use crate::cgroups::{cgroup2_root, first_line, in_cgroup, TestCgroup};
use crate::common::{
    can_run_in_netns, promtool_check_metrics, scrape_at, serial, workspace_bin, Need, Receiver,
    Running,
};

/// The lossy service's port and connections, and the idle one's.
const LOSSY: u16 = 20001;
const QUIET: u16 = 20002;
const LOSSY_CONNECTIONS: usize = 6;
const QUIET_CONNECTIONS: usize = 4;

/// A service: a listener on a port and connections to it, every client
/// sending CHUNK bytes every 20 ms (none for 0) and every server end reading
/// them, until stdin closes. Arguments: PORT CONNECTIONS CHUNK.
const SERVICE: &str = r#"
import select, socket, sys
port, n, chunk = map(int, sys.argv[1:4])
l = socket.socket()
l.bind(('127.0.0.1', port))
l.listen(64)
clients = [socket.create_connection(('127.0.0.1', port)) for _ in range(n)]
servers = [l.accept()[0] for _ in range(n)]
for s in clients + servers:
    s.setblocking(False)
print('ready', flush=True)
data = b'x' * chunk
while not select.select([sys.stdin], [], [], 0.02)[0]:
    for c in clients if chunk else []:
        try:
            c.send(data)
        except BlockingIOError:
            pass
    for s in servers:
        try:
            while s.recv(65536):
                pass
        except BlockingIOError:
            pass
"#;

/// A helper process, stopped (its stdin closed) on drop.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// `python3 -c script args` in `ns` (through `nsenter`, which keeps the
/// cgroup2 mount) and in the cgroup `dir`, once it printed its first line.
fn helper_in(dir: &Path, ns: &Netns, script: &str, args: &[String]) -> (Helper, String) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name()))
        .args(["python3", "-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    in_cgroup(&mut cmd, dir);
    let mut child = cmd.spawn().unwrap();
    let line = first_line(&mut child);
    (Helper(child), line)
}

/// Drops about a tenth of the packets to or from `port` as they come in on
/// the namespace's loopback. This kernel has neither netem nor the gact
/// action: a classic BPF filter picks the packets (by port, then by the
/// kernel's random number) and `mirred` sends them to a veth whose peer is
/// down, where they are dropped.
fn lossy_loopback(ns: &Netns, port: u16) {
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .arg("-n")
            .arg(ns.name())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    ip(&[
        "link", "add", "sink0", "type", "veth", "peer", "name", "sink1",
    ]);
    ip(&["link", "set", "sink0", "up"]);
    let tc = |args: &[&str]| {
        let out = Command::new("tc")
            .arg("-n")
            .arg(ns.name())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tc {args:?}: {out:?}");
    };
    tc(&["qdisc", "add", "dev", "lo", "clsact"]);
    // At ingress the program sees the Ethernet header first: the TCP ports
    // are at 34 and 36 (an IPv4 header without options). ld rand is
    // SKF_AD_OFF + SKF_AD_RANDOM; 26 of 256 values match.
    let program = format!(
        "9,40 0 0 34,21 2 0 {port},40 0 0 36,21 0 4 {port},32 0 0 4294963256,84 0 0 255,\
         37 1 0 25,6 0 0 4294967295,6 0 0 0"
    );
    tc(&[
        "filter", "add", "dev", "lo", "ingress", "protocol", "ip", "bpf", "bytecode", &program,
        "action", "mirred", "egress", "redirect", "dev", "sink0",
    ]);
}

/// Lines of a child's output, gathered by a thread as they come.
fn gather(output: impl BufRead + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let into = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in output.lines().map_while(Result::ok) {
            into.lock().unwrap().push(line);
        }
    });
    lines
}

/// The OTLP receiver (`otlp_receiver.py`) answering `status`: it, its
/// port, and the JSON lines of the requests it decoded.
fn otlp_receiver(status: u16) -> (Helper, u16, Arc<Mutex<Vec<String>>>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/otlp_receiver.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(status.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut child);
    let port = line
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok());
    let port = port.unwrap_or_else(|| panic!("the OTLP receiver said {line:?}"));
    let lines = gather(BufReader::new(child.stdout.take().unwrap()));
    (Helper(child), port, lines)
}

/// The exporter in the host's namespaces, with its metrics on a free port
/// and these flags: it, the metrics address, and its stderr lines.
fn xtcp_on_host(args: &[&str]) -> (Running, String, Arc<Mutex<Vec<String>>>) {
    let mut child = Running(Some(
        Command::new(workspace_bin("xtcp"))
            .args(["--prom-listen", "127.0.0.1:0", "--no-statsd"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut stderr = BufReader::new(child.child().stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("metrics at http://") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "xtcp exited");
    }
    let addr = line.split("http://").nth(1).unwrap();
    let addr = addr.split('/').next().unwrap().to_string();
    let lines = gather(stderr);
    (child, addr, lines)
}

/// Every series of `name` in a scrape: its labels and value.
fn series(scrape: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    scrape
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split("\",")
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once("=\"").unwrap();
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// A group as the labels name it.
type Group = (String, String, String);

fn group_of(labels: &BTreeMap<String, String>) -> Group {
    (
        labels["service"].clone(),
        labels["side"].clone(),
        labels["port"].clone(),
    )
}

/// What the records say of a group at poll `p`.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    established: u64,
    listen: u64,
    rtt_observations: u64,
    retransmits: u64,
    segments_sent: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

/// Each record's group: its service (the cgroup's unit), the server side
/// when its local port is `ports`' listening one, else the client side of
/// its remote port (`listed` ports by number, others "ephemeral").
fn expected(
    records: &[Record],
    last_poll: u64,
    ports: &[u16],
    listed: &[u16],
) -> BTreeMap<Group, Expected> {
    let mut out: BTreeMap<Group, Expected> = BTreeMap::new();
    // Each connection's counters at its first poll and at `last_poll`.
    let mut first: BTreeMap<u64, [u64; 4]> = BTreeMap::new();
    let mut last: BTreeMap<u64, (Group, [u64; 4])> = BTreeMap::new();
    for r in records.iter().filter(|r| r.poll_id <= last_poll) {
        let local = r.inet_diag_msg_socket_source_port as u16;
        let remote = r.inet_diag_msg_socket_destination_port as u16;
        let group = if ports.contains(&local) {
            (r.systemd_unit.clone(), "server".into(), local.to_string())
        } else if listed.contains(&remote) {
            (r.systemd_unit.clone(), "client".into(), remote.to_string())
        } else {
            (r.systemd_unit.clone(), "client".into(), "ephemeral".into())
        };
        let e = out.entry(group.clone()).or_default();
        if r.inet_diag_msg_state == 1 {
            e.rtt_observations += 1;
        }
        if r.poll_id == last_poll {
            match r.inet_diag_msg_state {
                1 => e.established += 1,
                10 => e.listen += 1,
                other => panic!("state {other}: {r:?}"),
            }
        }
        let counters = [
            u64::from(r.tcp_info_total_retrans.unwrap_or(0)),
            u64::from(r.tcp_info_segs_out.unwrap_or(0)),
            r.tcp_info_bytes_sent.unwrap_or(0),
            r.tcp_info_bytes_received.unwrap_or(0),
        ];
        let cookie = r.inet_diag_msg_socket_cookie;
        if r.poll_id == 1 {
            first.insert(cookie, counters);
        }
        if r.poll_id == last_poll {
            last.insert(cookie, (group, counters));
        }
    }
    for (cookie, (group, now)) in last {
        let then = first[&cookie];
        let e = out.get_mut(&group).unwrap();
        e.retransmits += now[0] - then[0];
        e.segments_sent += now[1] - then[1];
        e.bytes_sent += now[2] - then[2];
        e.bytes_received += now[3] - then[3];
    }
    out
}

/// One number of [`Expected`].
type Field = fn(&mut Expected) -> &mut u64;

/// What a scrape says of the groups of `services`.
fn scraped(scrape: &str, services: &[&str]) -> BTreeMap<Group, Expected> {
    let mut out: BTreeMap<Group, Expected> = BTreeMap::new();
    let ours = |labels: &BTreeMap<String, String>| services.contains(&labels["service"].as_str());
    for (labels, v) in series(scrape, "xtcp_service_connections") {
        if ours(&labels) {
            let e = out.entry(group_of(&labels)).or_default();
            match labels["state"].as_str() {
                "established" => e.established = v as u64,
                "listen" => e.listen = v as u64,
                other => assert_eq!(v, 0.0, "{other}"),
            }
        }
    }
    let counters: [(&str, Field); 5] = [
        ("xtcp_service_rtt_seconds_count", |e| {
            &mut e.rtt_observations
        }),
        ("xtcp_service_retransmitted_segments_total", |e| {
            &mut e.retransmits
        }),
        ("xtcp_service_sent_segments_total", |e| &mut e.segments_sent),
        ("xtcp_service_sent_bytes_total", |e| &mut e.bytes_sent),
        ("xtcp_service_received_bytes_total", |e| {
            &mut e.bytes_received
        }),
    ];
    for (name, field) in counters {
        for (labels, v) in series(scrape, name) {
            if ours(&labels) {
                *field(out.entry(group_of(&labels)).or_default()) = v as u64;
            }
        }
    }
    out
}

/// What the OTLP request says of the groups of `services`.
fn pushed(request: &Value, services: &[&str]) -> BTreeMap<Group, Expected> {
    let mut out: BTreeMap<Group, Expected> = BTreeMap::new();
    for metric in request["metrics"].as_array().unwrap() {
        for p in metric["points"].as_array().unwrap() {
            let a = &p["attributes"];
            let service = a["xtcp.service"].as_str().unwrap().to_string();
            if !services.contains(&service.as_str()) {
                continue;
            }
            let port = a["server.port"]
                .as_i64()
                .map_or("ephemeral".to_string(), |p| p.to_string());
            let side = a["xtcp.side"].as_str().unwrap().to_string();
            let e = out.entry((service, side, port)).or_default();
            let int = || p["value"].as_i64().unwrap() as u64;
            match metric["name"].as_str().unwrap() {
                "system.network.connection.count" => {
                    assert_eq!(a["network.transport"], "tcp");
                    match a["network.connection.state"].as_str().unwrap() {
                        "established" => e.established = int(),
                        "listen" => e.listen = int(),
                        _ => assert_eq!(int(), 0),
                    }
                }
                "xtcp.tcp.rtt" => e.rtt_observations = p["count"].as_u64().unwrap(),
                "xtcp.tcp.retransmits" => e.retransmits = int(),
                "xtcp.tcp.sent_segments" => e.segments_sent = int(),
                "system.network.io" => match a["network.io.direction"].as_str().unwrap() {
                    "transmit" => e.bytes_sent = int(),
                    _ => e.bytes_received = int(),
                },
                _ => {}
            }
        }
    }
    out
}

/// Scrapes `addr` until `xtcp_service_poll` reaches `poll`; that scrape.
fn scrape_at_poll(addr: &str, poll: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrape = scrape_at(addr);
        let at = series(&scrape, "xtcp_service_poll");
        if at.first().is_some_and(|(_, p)| *p as u64 >= poll) {
            return scrape;
        }
        assert!(Instant::now() < deadline, "no poll {poll}:\n{scrape}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn per_service_health_matches_the_records_of_a_lossy_and_a_quiet_service() {
    let needs = [
        Need::Tool("tc"),
        Need::Tool("nsenter"),
        Need::Tool("python3"),
        Need::Tool("promtool"),
        Need::Python("opentelemetry.proto"),
    ];
    if !can_run_in_netns(&needs) {
        return;
    }
    let _serial = serial();
    let ns = Netns::create("agg").unwrap();
    lossy_loopback(&ns, LOSSY);
    let root = cgroup2_root();
    let pid = std::process::id();
    let units = [LOSSY, QUIET].map(|port| format!("xtcp-agg-{port}-{pid}.service"));
    let cgroups = units.clone().map(|u| TestCgroup(root.join(u)));
    for cgroup in &cgroups {
        std::fs::create_dir(&cgroup.0).unwrap();
    }
    let lossy = helper_in(
        &cgroups[0].0,
        &ns,
        SERVICE,
        &[
            LOSSY.to_string(),
            LOSSY_CONNECTIONS.to_string(),
            "32768".into(),
        ],
    );
    let quiet = helper_in(
        &cgroups[1].0,
        &ns,
        SERVICE,
        &[QUIET.to_string(), QUIET_CONNECTIONS.to_string(), "0".into()],
    );
    assert_eq!((lossy.1.trim(), quiet.1.trim()), ("ready", "ready"));

    let records = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    records
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let dest = format!("udp:{}", records.local_addr().unwrap());
    let receiver = Receiver::on(records);
    let (otlp, otlp_port, pushes) = otlp_receiver(200);
    let otlp_url = format!("http://127.0.0.1:{otlp_port}/v1/metrics");
    let (xtcp, addr, stderr) = xtcp_on_host(&[
        "--netns",
        ns.name(),
        "--frequency",
        "1s",
        "--dest",
        &dest,
        "--aggregate-ports",
        &QUIET.to_string(),
        "--otlp-url",
        &otlp_url,
    ]);
    let scrape = scrape_at_poll(&addr, 5);
    let (status, _) = xtcp.terminate();
    assert!(status.success(), "{status:?}");
    let records = receiver.finish().records;
    drop(otlp);
    let poll = series(&scrape, "xtcp_service_poll")[0].1 as u64;

    let services: Vec<&str> = units.iter().map(String::as_str).collect();
    let want = expected(&records, poll, &[LOSSY, QUIET], &[QUIET]);
    let got = scraped(&scrape, &services);
    assert_eq!(got, want, "{scrape}");
    // The groups are those of the two services, as they should be.
    let groups: BTreeSet<&Group> = got.keys().collect();
    let named = |unit: &str, side: &str, port: &str| (unit.to_string(), side.into(), port.into());
    let all = [
        named(&units[0], "client", "ephemeral"),
        named(&units[0], "server", "20001"),
        named(&units[1], "client", "20002"),
        named(&units[1], "server", "20002"),
    ];
    assert_eq!(groups, all.iter().collect());
    let n = |g: &Group| match g.0 == units[0] {
        true => LOSSY_CONNECTIONS as u64,
        false => QUIET_CONNECTIONS as u64,
    };
    for (group, e) in &got {
        assert_eq!(e.established, n(group), "{group:?}");
        assert_eq!(e.listen, u64::from(group.1 == "server"), "{group:?}");
        assert_eq!(e.rtt_observations, n(group) * poll, "{group:?}");
        if group.0 == units[1] {
            assert_eq!(e.retransmits, 0, "{group:?}: the quiet service");
        }
    }
    let lossy_retransmits: u64 = got
        .iter()
        .filter(|(g, _)| g.0 == units[0])
        .map(|(_, e)| e.retransmits)
        .sum();
    assert!(lossy_retransmits > 0, "no loss made: {got:?}");

    // promtool reads the scrape as Prometheus would, lint included.
    let body = scrape
        .split_once("\r\n\r\n")
        .map_or(&scrape[..], |(_, b)| b);
    promtool_check_metrics(body);

    // The push of the same poll: the one whose histogram counts that many
    // polls.
    let pushes = pushes.lock().unwrap().clone();
    let requests: Vec<Value> = pushes
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let same = requests
        .iter()
        .find(|r| pushed(r, &services) == got)
        .unwrap_or_else(|| panic!("no push says {got:?}: {pushes:?}"));
    assert_eq!(same["path"], "/v1/metrics");
    assert_eq!(same["content_type"], "application/x-protobuf");
    assert_eq!(same["content_encoding"], "gzip");
    assert_eq!(same["resource"][0]["service.name"], "xtcp");
    let rtt = same["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "xtcp.tcp.rtt")
        .unwrap();
    assert_eq!(
        (rtt["kind"].as_str(), rtt["unit"].as_str()),
        (Some("histogram"), Some("s"))
    );
    assert_eq!(rtt["temporality"], 2, "cumulative");
    let stderr = stderr.lock().unwrap();
    assert!(
        !stderr.iter().any(|l| l.contains("pushing metrics")),
        "{stderr:?}"
    );
}

/// Short connections: a listener on PORT; on a line on stdin, COUNT
/// connections each send BYTES and close, the server end reading them all
/// before it closes too; then "done". Arguments: PORT COUNT BYTES.
const CHURN: &str = r#"
import socket, sys
port, count, size = map(int, sys.argv[1:4])
l = socket.socket()
l.bind(('127.0.0.1', port))
l.listen(64)
print('ready', flush=True)
sys.stdin.readline()
for _ in range(count):
    c = socket.create_connection(('127.0.0.1', port))
    a, _ = l.accept()
    c.sendall(b'x' * size)
    c.close()
    got = 0
    while True:
        data = a.recv(65536)
        if not data:
            break
        got += len(data)
    assert got == size
    a.close()
print('done', flush=True)
sys.stdin.read()
"#;

/// A namespace `xtcp-TAG-PID` and a cgroup named like a systemd service,
/// `xtcp-TAG-PID.service`, its name the service label.
fn namespace_and_service(tag: &str) -> (Netns, String, TestCgroup) {
    let ns = Netns::create(tag).unwrap();
    let unit = format!("xtcp-{tag}-{}.service", std::process::id());
    let cgroup = TestCgroup(cgroup2_root().join(&unit));
    std::fs::create_dir(&cgroup.0).unwrap();
    (ns, unit, cgroup)
}

/// The sum of `name` over the series whose labels satisfy `select`.
fn total(scrape: &str, name: &str, select: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
    series(scrape, name)
        .iter()
        .filter(|(labels, _)| select(labels))
        .map(|(_, v)| v)
        .sum()
}

/// Connections that open and close between two polls count through their
/// close messages: every byte of them, on each side.
#[test]
fn short_connections_count_through_their_close_messages() {
    if !can_run_in_netns(&[Need::Tool("nsenter"), Need::Tool("python3")]) {
        return;
    }
    let _serial = serial();
    let (ns, unit, cgroup) = namespace_and_service("aggclose");
    const COUNT: u64 = 40;
    const BYTES: u64 = 5000;
    let port = 20003;
    let args = [port, COUNT, BYTES].map(|v| v.to_string());
    let (mut churn, ready) = helper_in(&cgroup.0, &ns, CHURN, &args);
    assert_eq!(ready.trim(), "ready");
    let (xtcp, addr, _stderr) = xtcp_on_host(&[
        "--netns",
        ns.name(),
        "--frequency",
        "300ms",
        "--dest",
        "udp:127.0.0.1:9",
        "--close-records",
    ]);
    // After a first poll, so the connections are all new to the run.
    scrape_at_poll(&addr, 2);
    use std::io::Write;
    writeln!(churn.0.stdin.as_mut().unwrap(), "go").unwrap();
    assert_eq!(first_line(&mut churn.0).trim(), "done");
    let poll = series(&scrape_at(&addr), "xtcp_service_poll")[0].1 as u64;
    // Every close message is read by then: the closer reads them as they
    // come, and a poll's end publishes what was read.
    let scrape = scrape_at_poll(&addr, poll + 2);
    let server = |l: &BTreeMap<String, String>| {
        l["service"] == unit && l["side"] == "server" && l["port"] == port.to_string()
    };
    let client = |l: &BTreeMap<String, String>| l["side"] == "client" && l["port"] == "ephemeral";
    // The kernel's received bytes count each FIN as one (a sequence
    // number, as rcv_nxt moves).
    let (sent, received) = (
        "xtcp_service_sent_bytes_total",
        "xtcp_service_received_bytes_total",
    );
    let want = (COUNT * BYTES) as f64;
    assert_eq!(
        total(&scrape, received, server),
        want + COUNT as f64,
        "{scrape}"
    );
    assert_eq!(total(&scrape, sent, server), 0.0);
    assert_eq!(total(&scrape, sent, client), want, "{scrape}");
    assert_eq!(total(&scrape, received, client), COUNT as f64);
    // A client connection never polled has no cgroup: its close says none.
    for (labels, _) in series(&scrape, "xtcp_service_sent_bytes_total") {
        if client(&labels) {
            assert!([unit.as_str(), "unattributed"].contains(&labels["service"].as_str()));
        }
    }
    drop(xtcp);
}

/// Hundreds of peer groups: past `--aggregate-groups` they fold into one
/// group and are counted; none of their sockets is lost; with the sockets
/// gone, every group goes after `--aggregate-ttl` polls.
#[test]
fn the_cap_folds_hundreds_of_groups_and_the_ttl_removes_them() {
    if !can_run_in_netns(&[Need::Tool("nsenter"), Need::Tool("python3")]) {
        return;
    }
    let _serial = serial();
    let (ns, unit, cgroup) = namespace_and_service("aggcap");
    // 300 listeners, one connection to each, every port listed, loopback
    // named as a network: 300 server groups of connections (network lo),
    // 300 of listeners (no peer: network other) and 300 client groups.
    const PORTS: u16 = 300;
    // At the end they are reset (SO_LINGER 0), leaving no TIME_WAIT.
    let hold = format!(
        "import socket, struct, sys
held = []
for port in range(21000, 21000 + {PORTS}):
    l = socket.socket(); l.bind(('127.0.0.1', port)); l.listen()
    c = socket.create_connection(('127.0.0.1', port)); a, _ = l.accept()
    held += [l, c, a]
print('ready', flush=True); sys.stdin.read()
for s in held:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); s.close()"
    );
    let (helper, ready) = helper_in(&cgroup.0, &ns, &hold, &[]);
    assert_eq!(ready.trim(), "ready");
    let listed: Vec<String> = (21000..21000 + PORTS).map(|p| p.to_string()).collect();
    let listed = listed.join(",");
    let (xtcp, addr, _stderr) = xtcp_on_host(&[
        "--netns",
        ns.name(),
        "--frequency",
        "300ms",
        "--dest",
        "udp:127.0.0.1:9",
        "--aggregate-ports",
        &listed,
        "--aggregate-groups",
        "50",
        "--aggregate-ttl",
        "3",
        "--aggregate-networks",
        "lo=127.0.0.0/8",
    ]);
    let scrape = scrape_at_poll(&addr, 2);
    let value = |name: &str| series(&scrape, name)[0].1;
    assert_eq!(
        value("xtcp_aggregate_groups"),
        51.0,
        "50 and the folded one"
    );
    assert_eq!(value("xtcp_aggregate_folded_groups"), 850.0);
    let established = |l: &BTreeMap<String, String>| l["state"] == "established";
    let listen = |l: &BTreeMap<String, String>| l["state"] == "listen";
    let connections = "xtcp_service_connections";
    assert_eq!(total(&scrape, connections, established), 600.0, "none lost");
    assert_eq!(total(&scrape, connections, listen), 300.0);
    let groups: BTreeSet<Group> = series(&scrape, connections)
        .iter()
        .map(|(l, _)| group_of(l))
        .collect();
    assert_eq!(groups.len(), 51);
    let other = (
        "other".to_string(),
        "other".to_string(),
        "other".to_string(),
    );
    assert!(groups.contains(&other), "{groups:?}");
    // Each histogram has one series per group, whatever the sockets.
    assert_eq!(series(&scrape, "xtcp_service_rtt_seconds_count").len(), 51);
    // Connections have a peer on loopback; a listener has none (0.0.0.0 in
    // the kernel's message), which is in no named network. The folded group
    // has them all.
    for (labels, v) in series(&scrape, connections) {
        if labels["side"] == "other" {
            continue;
        }
        assert_eq!(labels["service"], unit);
        let want = if labels["state"] == "listen" {
            "other"
        } else {
            "lo"
        };
        assert!(v == 0.0 || labels["network"] == want, "{labels:?} {v}");
    }

    drop(helper);
    let gone = scrape_at_poll(&addr, value("xtcp_service_poll") as u64 + 5);
    assert_eq!(series(&gone, "xtcp_aggregate_groups")[0].1, 0.0, "{gone}");
    assert_eq!(
        series(&gone, "xtcp_aggregate_expired_groups_total")[0].1,
        51.0
    );
    assert!(series(&gone, connections).is_empty(), "{gone}");
    drop(xtcp);
}

/// A collector that answers 503 is tried three times a push, and each
/// failed push is counted; one that answers 400 is not tried again. One
/// warning either way.
#[test]
fn otlp_pushes_that_fail_are_counted_and_tried_within_bounds() {
    if !can_run_in_netns(&[Need::Tool("python3"), Need::Python("opentelemetry.proto")]) {
        return;
    }
    let _serial = serial();
    let ns = Netns::create("aggotlp").unwrap();
    for (status, tries) in [(503, 3), (400, 1)] {
        let (receiver, port, requests) = otlp_receiver(status);
        let url = format!("http://127.0.0.1:{port}/v1/metrics");
        let (xtcp, addr, stderr) = xtcp_on_host(&[
            "--netns",
            ns.name(),
            "--frequency",
            "200ms",
            "--dest",
            "udp:127.0.0.1:9",
            "--otlp-url",
            &url,
        ]);
        let failed = r#"xtcp_otlp_exports_total{result="failed"}"#;
        let deadline = Instant::now() + Duration::from_secs(30);
        let scrape = loop {
            let scrape = scrape_at(&addr);
            if crate::common::metric::<u64>(&scrape, failed).is_some_and(|n| n >= 2) {
                break scrape;
            }
            assert!(Instant::now() < deadline, "{scrape}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let metric = |name| crate::common::metric::<u64>(&scrape, name).unwrap();
        let (failed, retries) = (metric(failed), metric("xtcp_otlp_retries_total"));
        assert_eq!(metric(r#"xtcp_otlp_exports_total{result="delivered"}"#), 0);
        // The push in flight may have been tried again already.
        let extra = tries - 1;
        assert!(
            (extra * failed..=extra * (failed + 1)).contains(&retries),
            "{status}: {failed} failed, {retries} retries"
        );
        let (status_code, _) = xtcp.terminate();
        assert!(status_code.success());
        drop(receiver);
        assert!(requests.lock().unwrap().len() as u64 >= tries * failed);
        let warnings = stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("pushing metrics"))
            .count();
        assert_eq!(warnings, 1, "{status}");
    }
}
