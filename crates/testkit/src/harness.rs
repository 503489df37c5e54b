//! Helpers shared by the integration tests (the workspace's `tests/it` and
//! the forwarder's `tests/kafka.rs`): what a test needs and whether it is
//! here, the programs under test, a farm of loopback connections in a
//! private network namespace, child processes and UDP receivers.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use xtcp_feed::datagram::{decode_datagram, Datagram};
use xtcp_feed::proto::{Record, Watermark};

use crate::{established_pairs, Netns, Pairs};

/// Connections per family.
pub const PAIRS: usize = 2500;
pub const PORT: u16 = 13000;

pub type Key = (u32, u16, u16);

static SERIAL: Mutex<()> = Mutex::new(());

/// Held by every test that runs the exporter or makes namespaces, so they
/// take turns: their CPU time, timings and open files are their own.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Root: namespaces, `SO_RCVBUFFORCE`, the unit's checks.
    Root,
    /// A program on the PATH.
    Tool(&'static str),
    /// A Python module (`python3 -c 'import NAME'`).
    Python(&'static str),
}

impl Need {
    fn missing(self) -> Option<String> {
        match self {
            Need::Root => (!nix::unistd::geteuid().is_root()).then(|| "root".to_string()),
            Need::Tool(tool) => {
                let found = std::env::var_os("PATH").is_some_and(|path| {
                    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
                });
                (!found).then(|| format!("`{tool}` on the PATH"))
            }
            Need::Python(module) => {
                let found = Command::new("python3")
                    .args(["-c", &format!("import {module}")])
                    .output()
                    .is_ok_and(|o| o.status.success());
                (!found).then(|| format!("the Python module {module}"))
            }
        }
    }
}

/// Whether the calling test can run here. When something it needs is
/// missing it says so on stderr (not captured, so it shows in the test
/// output) and returns `false`, and the test passes without running; under
/// `XTCP_TEST_REQUIRE_ALL` (`make test`, CI) it fails instead.
#[must_use]
pub fn can_run(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(|n| n.missing()).collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    let missing = missing.join(", ");
    assert!(
        std::env::var_os("XTCP_TEST_REQUIRE_ALL").is_none(),
        "{test} cannot run: it needs {missing}, and XTCP_TEST_REQUIRE_ALL is set \
         (`make test` installs the tools; run it as root)"
    );
    let why = format!("{test}: skipped, it needs {missing}");
    // One write, so the line is not torn by the test runner's own output.
    let _ = std::io::stderr().write_all(format!("{why}\n").as_bytes());
    false
}

/// [`can_run`] for a test that makes network namespaces: root and `ip`,
/// and `more`.
pub fn can_run_in_netns(more: &[Need]) -> bool {
    let needs: Vec<Need> = [Need::Root, Need::Tool("ip")]
        .into_iter()
        .chain(more.iter().copied())
        .collect();
    can_run(&needs)
}

/// The path of a program of the workspace (`xtcp`, `xtcp-forwarder`,
/// `xtcp-debug-server`, `xtcp-top`, `xtcp-socket-farm`): cargo gives a test only its own
/// package's, so the first call builds them all, with the profile of this
/// test binary, and they sit beside it in the target dir.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/it-<hash> -> target/<profile>
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>/deps")
            .to_path_buf();
        let mut cargo = Command::new(env!("CARGO"));
        cargo.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--locked",
            "-p",
            "xtcp",
            "-p",
            "xtcp-forwarder",
            "-p",
            "xtcp-debug-server",
            "-p",
            "xtcp-top",
            "-p",
            "xtcp-testkit",
            "--bins",
        ]);
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cargo.arg("--target-dir").arg(target);
        }
        let status = cargo.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the workspace's programs failed"
        );
        profile_dir
    });
    dir.join(name)
}

/// A namespace holding the connections, deleted on drop.
pub struct Farm {
    pub ns: Netns,
    pub keys: BTreeSet<Key>,
    /// The IPv4 and the IPv6 connections.
    pub pairs: Vec<Pairs>,
    _serial: MutexGuard<'static, ()>,
}

impl Farm {
    /// The farm, or `None` when this machine lacks root or `ip` (said by
    /// [`can_run`]).
    pub fn new(tag: &str) -> Option<Farm> {
        Farm::needing(tag, &[])
    }

    /// The farm, or `None` when this machine lacks root, `ip` or any of
    /// `more` (said by [`can_run`]).
    pub fn needing(tag: &str, more: &[Need]) -> Option<Farm> {
        if !can_run_in_netns(more) {
            return None;
        }
        let serial = serial();
        // 10002 sockets, the receivers and the test harness's own files.
        let (_, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .unwrap();
        let ns = Netns::create(tag).expect("create network namespace (run the tests as root)");
        let pairs = in_ns(&ns, || {
            [
                SocketAddr::from((Ipv4Addr::LOCALHOST, 40001)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, 40001)),
            ]
            .map(|addr| established_pairs(addr, PAIRS, false).expect("open connections"))
        });
        let keys: BTreeSet<Key> = pairs.iter().flat_map(|p| p.keys().unwrap()).collect();
        assert_eq!(keys.len(), 2 * (2 * PAIRS + 1));
        Some(Farm {
            ns,
            keys,
            pairs: pairs.into(),
            _serial: serial,
        })
    }

    /// `xtcp` inside the namespace with these flags and `--no-prom`: the
    /// metrics listener would be one more socket than the farm's.
    pub fn xtcp(&self, args: &[&str]) -> Command {
        let mut cmd = self.exec(workspace_bin("xtcp"), args);
        cmd.arg("--no-prom");
        cmd
    }

    pub fn exec(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Command {
        self.ns.exec(program, args)
    }
}

impl Farm {
    /// `xtcp-debug-server` in the namespace on the records' port, with
    /// `args`, once bound; its stdout and stderr piped.
    pub fn debug_server(&self, args: &[&str]) -> Running {
        let listen = format!("127.0.0.1:{PORT}");
        let mut args = args.to_vec();
        args.extend(["--listen", &listen]);
        let mut child = Running(Some(
            self.exec(workspace_bin("xtcp-debug-server"), &args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        wait_bound(&self.ns, PORT, &mut child);
        child
    }
}

/// Waits until `child` has bound UDP `port` in `ns`.
pub fn wait_bound(ns: &Netns, port: u16, child: &mut Running) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while in_ns(ns, || udp_queued(port)).is_none() {
        assert!(std::time::Instant::now() < deadline, "nothing bound {port}");
        assert!(child.child().try_wait().unwrap().is_none(), "it exited");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An empty private namespace for a test's own programs (a receiver, its
/// senders, its scrapes), so that fixed ports are theirs and nothing else
/// on the host can take them; deleted on drop. Held with [`serial`].
pub struct Alone {
    pub ns: Netns,
    _serial: MutexGuard<'static, ()>,
}

impl Alone {
    /// The namespace, or `None` when this machine lacks root, `ip` or any
    /// of `more` (said by [`can_run`]).
    pub fn new(tag: &str, more: &[Need]) -> Option<Alone> {
        if !can_run_in_netns(more) {
            return None;
        }
        let serial = serial();
        let ns = Netns::create(tag).expect("create network namespace (run the tests as root)");
        Some(Alone {
            ns,
            _serial: serial,
        })
    }

    /// `program args` inside the namespace.
    pub fn exec(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Command {
        self.ns.exec(program, args)
    }

    /// Waits until `child` has bound UDP `port` in the namespace.
    pub fn wait_bound(&self, port: u16, child: &mut Running) {
        wait_bound(&self.ns, port, child);
    }

    /// A UDP socket of the namespace, to send to its programs.
    pub fn sender(&self) -> UdpSocket {
        in_ns(&self.ns, || UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    /// Bytes waiting on UDP `port` of the namespace.
    pub fn queued(&self, port: u16) -> Option<u64> {
        in_ns(&self.ns, || udp_queued(port))
    }
}

/// Runs `f` on a thread inside the namespace (sockets it opens stay there).
pub fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("enter namespace");
            f()
        })
        .join()
        .unwrap()
    })
}

/// The metrics served on `127.0.0.1:port` of `ns` at `/metrics`, once
/// something serves them (10 s at most).
pub fn scrape(ns: &Netns, port: u16) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let connected = in_ns(ns, || {
            std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        });
        if let Ok(s) = connected {
            return get_metrics(s);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing served metrics on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The metrics served at `addr` (`HOST:PORT`) in this namespace.
pub fn scrape_at(addr: &str) -> String {
    get_metrics(std::net::TcpStream::connect(addr).unwrap())
}

fn get_metrics(mut s: std::net::TcpStream) -> String {
    use std::io::Read;
    s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Fails the test unless `promtool check metrics` (Debian's package
/// prometheus) finds the exposition `text` clean, lint included.
pub fn promtool_check_metrics(text: &str) {
    promtool(&["check", "metrics"], text);
}

/// Fails the test, with promtool's words, unless `promtool ARGS` given
/// `input` on stdin succeeds.
pub fn promtool(args: &[&str], input: &str) {
    let mut promtool = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; .ci/run installs it)");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the series `name` (with its labels, `x{a="b"}`) in a
/// scrape.
pub fn metric<T: std::str::FromStr>(scrape: &str, name: &str) -> Option<T> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

pub fn key(r: &Record) -> Key {
    (
        r.inet_diag_msg_family,
        r.inet_diag_msg_socket_source_port as u16,
        r.inet_diag_msg_socket_destination_port as u16,
    )
}

/// Records by poll id.
pub fn by_poll(records: &[Record]) -> BTreeMap<u64, Vec<&Record>> {
    let mut polls: BTreeMap<u64, Vec<&Record>> = BTreeMap::new();
    for r in records {
        polls.entry(r.poll_id).or_default().push(r);
    }
    polls
}

pub fn run(mut cmd: Command) -> (Output, String) {
    let out = cmd.output().expect("run xtcp");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    (out, stderr)
}

/// The value after `name` in the family section of the totals line
/// (`xtcp: stopped: polls 2 ... | v4 sockets 5001 ...`); family "" = the head.
pub fn total(stderr: &str, family: &str, name: &str) -> u64 {
    stopped_value(stderr, "xtcp", family, name)
}

/// The sum of `name` over every dump's section of the totals line: the one
/// dump of both families (`all`), or each family's.
pub fn dumps_total(stderr: &str, name: &str) -> u64 {
    ["all", "v4", "v6"]
        .iter()
        .filter(|family| stderr.contains(&format!(" | {family} ")))
        .map(|family| total(stderr, family, name))
        .sum()
}

/// The value after `name` in `program`'s exit line (`PROGRAM: stopped: ...`),
/// within the ` | `-separated section that starts with `section` ("" = the
/// first).
pub fn stopped_value(stderr: &str, program: &str, section: &str, name: &str) -> u64 {
    let prefix = format!("{program}: stopped: ");
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no totals line: {stderr}"));
    let part = line
        .split(" | ")
        .find(|s| section.is_empty() || s.starts_with(&format!("{section} ")))
        .unwrap_or_else(|| panic!("no {section} in {line}"));
    let words: Vec<&str> = part.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == name)
        .unwrap_or_else(|| panic!("no {name} in {part}"));
    words[at + 1].parse().unwrap()
}

/// Threads of another process stopped by ptrace: only they stop, the rest
/// of the process runs on. They run again when this is dropped (or when the
/// test process ends, which detaches them).
pub struct StoppedThreads(Vec<Pid>);

impl StoppedThreads {
    /// Stops the threads of process `pid` whose name starts with `prefix`.
    pub fn stop(pid: u32, prefix: &str) -> StoppedThreads {
        let mut stopped = StoppedThreads(Vec::new());
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
        for task in tasks {
            let task = task.unwrap().path();
            let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if !name.starts_with(prefix) {
                continue;
            }
            let tid: i32 = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let tid = Pid::from_raw(tid);
            ptrace::seize(tid, ptrace::Options::empty()).expect("ptrace the thread (root)");
            stopped.0.push(tid);
            ptrace::interrupt(tid).expect("stop the thread");
            waitpid(tid, Some(WaitPidFlag::__WALL)).expect("the thread stops");
        }
        stopped
    }

    /// How many threads are stopped.
    pub fn count(&self) -> usize {
        self.0.len()
    }
}

impl Drop for StoppedThreads {
    fn drop(&mut self) {
        for &tid in &self.0 {
            let _ = ptrace::detach(tid, None);
        }
    }
}

/// A child process, killed and reaped if the test fails before it ends.
pub struct Running(pub Option<Child>);

impl Running {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    /// Its exit status, waiting at most `limit`: a child still running then
    /// fails the test (and is killed on drop) rather than hanging it.
    pub fn wait_at_most(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child().try_wait().unwrap() {
                self.0 = None;
                return status;
            }
            assert!(started.elapsed() < limit, "still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status and stderr.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let child = self.0.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A UDP socket on the namespace's record port whose reads time out after
/// 50 ms. A poll of 10k records arrives as one burst: its buffer makes room
/// for it all (SO_RCVBUFFORCE, root), so a drop would be the exporter's.
pub fn bind_receiver(ns: &Netns) -> UdpSocket {
    in_ns(ns, || {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, PORT)).unwrap();
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    })
}

/// Adds the records of one received datagram (none for a watermark) to the
/// counts per poll id.
pub fn count_by_poll(polls: &mut BTreeMap<u64, u64>, datagram: &[u8]) {
    if let Datagram::Records(records) = decode_datagram(datagram).expect("decodable datagram") {
        for r in records {
            *polls.entry(r.poll_id).or_default() += 1;
        }
    }
}

/// A UDP receiver inside the namespace that keeps every datagram's records.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    /// Records received so far.
    count: Arc<AtomicU64>,
    thread: JoinHandle<Received>,
}

/// What a [`Receiver`] got.
#[derive(Default)]
pub struct Received {
    pub records: Vec<Record>,
    pub watermarks: Vec<Watermark>,
    /// Datagrams of records (the watermarks' not counted).
    pub datagrams: u64,
    pub bytes: u64,
}

impl Receiver {
    pub fn start(ns: &Netns) -> Receiver {
        Receiver::on(bind_receiver(ns))
    }

    /// A receiver reading `socket`, whose reads must time out.
    pub fn on(socket: UdpSocket) -> Receiver {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            move || {
                let mut got = Received::default();
                let mut buf = vec![0; 65536];
                loop {
                    match socket.recv(&mut buf) {
                        Ok(n) => match decode_datagram(&buf[..n]).expect("decodable datagram") {
                            Datagram::Records(records) => {
                                got.datagrams += 1;
                                got.bytes += n as u64;
                                count.fetch_add(records.len() as u64, Ordering::Relaxed);
                                got.records.extend(records);
                            }
                            Datagram::Watermark(mark) => got.watermarks.push(mark),
                        },
                        Err(_) if stop.load(Ordering::Relaxed) => return got,
                        Err(_) => {}
                    }
                }
            }
        });
        Receiver {
            stop,
            count,
            thread,
        }
    }

    /// Waits until `n` records arrived, at most `limit`; whether they did.
    pub fn wait_for(&self, n: u64, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.count.load(Ordering::Relaxed) < n {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Everything received; call once the exporter has exited (loopback
    /// delivers a datagram before `send` returns).
    pub fn finish(self) -> Received {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Records of one exporter run (`instance`), first poll, numbered
/// `first..first + n`, as one envelope.
pub fn numbered_envelope(instance: u64, first: u64, n: u64) -> Vec<u8> {
    use prost::Message as _;
    xtcp_feed::proto::Envelope {
        records: (first..first + n)
            .map(|record_counter| Record {
                schema_version: xtcp::export::record::SCHEMA_VERSION,
                hostname: "burst".into(),
                instance,
                poll_id: 1,
                record_counter,
                ..Default::default()
            })
            .collect(),
        watermark: None,
    }
    .encode_to_vec()
}

/// Bytes waiting in the receive queue of the UDP socket bound to `port`
/// (`/proc/net/udp` of the caller's namespace), if there is one.
pub fn udp_queued(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/thread-self/net/udp").ok()?;
    let local = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let queues = fields.get(4)?;
        fields[1]
            .ends_with(&local)
            .then(|| u64::from_str_radix(queues.split(':').nth(1)?, 16).ok())?
    })
}

/// A datagram holding run `instance`'s watermark: poll `poll_id` ended
/// with its records numbered up to `record_counter`; `stopped` at the end
/// of the run; `interval` its poll interval.
pub fn watermark_datagram(
    instance: u64,
    poll_id: u64,
    record_counter: u64,
    stopped: bool,
    interval: Duration,
) -> Vec<u8> {
    use prost::Message as _;
    xtcp_feed::proto::Envelope {
        records: Vec::new(),
        watermark: Some(Watermark {
            schema_version: xtcp::export::record::SCHEMA_VERSION,
            hostname: "burst".into(),
            instance,
            poll_id,
            record_counter,
            stopped,
            poll_interval_ms: interval.as_millis() as u64,
        }),
    }
    .encode_to_vec()
}

/// Drives the receiver (process `pid`, UDP `port` on 127.0.0.1 of
/// `alone`'s namespace, a small receive buffer) into kernel drops: stops
/// it, sends `datagrams` envelopes of `per` records of one run (numbered
/// from 1), lets it run again, waits until it has read its queue, and sends
/// the run's stop watermark, so it knows how far the run went although the
/// last datagrams were dropped. Returns the records sent.
pub fn overflow_receiver(
    alone: &Alone,
    pid: u32,
    port: u16,
    instance: u64,
    datagrams: u64,
    per: u64,
) -> u64 {
    let sender = alone.sender();
    sender.connect(("127.0.0.1", port)).unwrap();
    let pid = Pid::from_raw(pid as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    for i in 0..datagrams {
        sender
            .send(&numbered_envelope(instance, 1 + i * per, per))
            .unwrap();
    }
    kill(pid, Signal::SIGCONT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alone.queued(port) != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the receiver did not read its queue"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = datagrams * per;
    let stop = watermark_datagram(instance, 1, sent, true, Duration::from_secs(30));
    sender.send(&stop).unwrap();
    sent
}

/// Runs `cmd` to its end and returns its exit code and stderr, which must
/// be one line (how every xtcp program reports a bad start).
pub fn one_line_exit(mut cmd: Command) -> (Option<i32>, String) {
    let out = cmd.output().expect("run the program");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    (out.status.code(), stderr)
}

/// A key file holding `key`, readable by its owner only, in the temporary
/// directory (`name` tells apart the files of one test process).
pub fn key_file(name: &str, key: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("feed-key-{name}-{}", std::process::id()));
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Runs `tools/clickhouse/check.py ARGS FILE` (ClickHouse, chdb) over
/// `messages` (length-delimited records) written to FILE, and returns what
/// it printed; a failure fails the test with its output.
pub fn clickhouse_check(args: &[&str], messages: &[u8]) -> String {
    let file = std::env::temp_dir().join(format!("xtcp-clickhouse-{}.bin", std::process::id()));
    std::fs::write(&file, messages).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tools/clickhouse/check.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .arg(&file)
        .output()
        .expect("python3");
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tools/clickhouse/check.py (pip install chdb): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A finished command's stdout and stderr together; its failure fails the
/// test with them, naming `what`.
pub fn succeeded(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}: {:?}\n{text}", out.status);
    text
}
