//! The UDP leg, as `xtcp-debug-server` sees it: a receiver with a small
//! buffer, stopped while a burst arrives, drops datagrams in the kernel, and
//! its totals must say exactly how many records never arrived, the tail of
//! a run too (from the exporter's watermarks); an exporter killed without a
//! word is counted silent; a feed signed with a shared key arrives whole.
//! (`crates/forwarder/tests/kafka.rs` does the same to the forwarder.)

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{
    dumps_total, in_ns, key_file, one_line_exit, overflow_receiver, run, stopped_value, total,
    udp_queued, workspace_bin, Alone, Farm, Running, PORT,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PROGRAM: &str = "xtcp-debug-server";

/// The debug server alone in a namespace, on the records' port, with
/// `args`, once bound.
fn start_receiver(alone: &Alone, args: &[&str]) -> Running {
    let listen = format!("127.0.0.1:{PORT}");
    let mut server = Running(Some(
        alone
            .exec(
                workspace_bin(PROGRAM),
                &["--format", "none", "--listen", &listen],
            )
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    alone.wait_bound(PORT, &mut server);
    server
}

#[test]
fn debug_server_counts_exactly_what_the_kernel_dropped() {
    let Some(alone) = Alone::new("drops", &[]) else {
        return;
    };
    // The smallest receive buffer the kernel grants.
    let mut server = start_receiver(&alone, &["--recv-buffer", "4096"]);
    let pid = server.child().id();
    let (datagrams, per) = (400, 5);
    let sent = overflow_receiver(&alone, pid, PORT, 0xfeed, datagrams, per);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let total = |name| stopped_value(&stderr, PROGRAM, "", name);
    let received = total("records");
    assert!(received < sent / 2, "no overflow: {stderr}");
    xtcp_service::say!(
        "{PROGRAM}: sent {sent} received {received} lost {} kernel_drops {} (x{per} records)",
        total("lost"),
        total("kernel_drops")
    );
    assert_eq!(total("lost"), sent - received, "{stderr}");
    // Every loss was a whole datagram the kernel dropped; the last ones,
    // seen only from the stop watermark, too.
    assert_eq!(total("kernel_drops") * per, sent - received, "{stderr}");
    assert_eq!(total("duplicated") + total("untracked"), 0, "{stderr}");
    assert_eq!((total("watermarks"), total("runs_stopped")), (1, 1));
}

/// An exporter and a debug server sharing a key: every record passes. A
/// bad key file, or a key with nothing to sign, stops the start in one line.
#[test]
fn a_signed_feed_reaches_a_receiver_with_the_key() {
    let Some(alone) = Alone::new("signed", &[]) else {
        return;
    };
    let key = key_file("it", format!("{}\n", "ab".repeat(32)).as_bytes());
    let key_arg = key.to_str().unwrap();
    let server = start_receiver(&alone, &["--feed-key", key_arg]);
    // One socket to export.
    let _listener = in_ns(&alone.ns, || {
        std::net::TcpListener::bind("127.0.0.1:40001").unwrap()
    });
    let dest = format!("udp:127.0.0.1:{PORT}");
    let (_, exporter) = run(alone.exec(
        workspace_bin("xtcp"),
        &[
            "--max-loops",
            "1",
            "--no-prom",
            "--no-statsd",
            "--feed-key",
            key_arg,
            "--dest",
            &dest,
        ],
    ));
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let sent = dumps_total(&exporter, "records");
    let received = |name| stopped_value(&stderr, PROGRAM, "", name);
    assert_eq!(sent, 1, "{exporter}");
    assert_eq!(received("records"), sent, "{stderr}");
    // The poll's watermark and the stop's, signed too.
    assert_eq!(received("watermarks"), 2, "{stderr}");
    for counter in ["unauthenticated", "undecodable", "lost"] {
        assert_eq!(received(counter), 0, "{stderr}");
    }

    let xtcp = |args: &[&str]| {
        let mut cmd = Command::new(workspace_bin("xtcp"));
        cmd.args(["--max-loops", "1", "--no-prom", "--no-statsd"])
            .args(args);
        one_line_exit(cmd)
    };
    let (code, said) = xtcp(&["--feed-key", "/nonexistent/feed.key"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("--feed-key: reading the feed key /nonexistent/feed.key"),
        "{said}"
    );
    std::fs::write(&key, "short").unwrap();
    let (code, said) = xtcp(&["--feed-key", key_arg]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("too short"), "{said}");
    let (code, said) = xtcp(&["--feed-key", key_arg, "--dest", "stdout"]);
    assert_eq!(code, Some(2), "{said}");
    std::fs::remove_file(&key).unwrap();
}

/// Lines a child writes to stderr, as they come; all of them once it ends.
struct Said {
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Said {
    fn follow(child: &mut Running) -> Said {
        let stderr = child.child().stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Said {
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 60 s) for a line that starts with `prefix`.
    fn wait_for(&mut self, prefix: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line {prefix:?}: {:#?}", self.seen));
            self.seen.push(line);
            if self.seen.last().is_some_and(|l| l.starts_with(prefix)) {
                return;
            }
        }
    }

    /// Every line, once the child has ended.
    fn all(mut self) -> String {
        self.seen.extend(self.lines.iter());
        self.seen.join("\n")
    }
}

fn signal(child: &mut Running, signal: Signal) {
    kill(Pid::from_raw(child.child().id() as i32), signal).unwrap();
}

/// One record per datagram into a 4 KiB buffer, the receiver stopped
/// through the whole poll: a few datagrams fit, the rest of the poll and its
/// watermark are dropped, and no later record comes to show the tail
/// missing. The stop watermark, sent into the receiver once it has read
/// its queue, shows it: records sent = received + lost, exactly.
#[test]
fn a_lost_tail_is_counted_from_the_stop_watermark() {
    let Some(farm) = Farm::new("tail") else {
        return;
    };
    // `ip netns exec` execs the program: the child is the server itself.
    let mut server = farm.debug_server(&["--format", "none", "--recv-buffer", "4096"]);
    signal(&mut server, Signal::SIGSTOP);
    // One poll, then nothing for an hour.
    let mut exporter = Running(Some(
        farm.xtcp(&["--frequency", "1h", "--udp-batch-bytes", "0", "-v"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut said = Said::follow(&mut exporter);
    // The poll's line comes after its watermark was sent.
    said.wait_for("poll 1:");
    signal(&mut server, Signal::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while in_ns(&farm.ns, || udp_queued(PORT)) != Some(0) {
        assert!(std::time::Instant::now() < deadline, "queue not read");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&mut exporter, Signal::SIGTERM);
    assert!(exporter.wait_at_most(Duration::from_secs(10)).success());
    let exporter = said.all();
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");

    let sent = dumps_total(&exporter, "records");
    assert_eq!(sent, farm.keys.len() as u64, "{exporter}");
    assert_eq!(total(&exporter, "", "watermarks"), 2, "{exporter}");
    let got = |name| stopped_value(&stderr, PROGRAM, "", name);
    let received = got("records");
    xtcp_service::say!(
        "{PROGRAM}: sent {sent} received {received} lost {} kernel_drops {}",
        got("lost"),
        got("kernel_drops")
    );
    assert!(received < sent / 100, "the tail was not lost: {stderr}");
    assert_eq!(received + got("lost"), sent, "{stderr}");
    // One record per datagram, and the poll's watermark.
    assert_eq!(got("kernel_drops"), sent - received + 1, "{stderr}");
    assert_eq!(got("watermarks"), 1, "the stop's: {stderr}");
    assert_eq!((got("runs_heard"), got("runs_stopped")), (1, 1), "{stderr}");
    for none in ["duplicated", "untracked", "runs_silent"] {
        assert_eq!(got(none), 0, "{none}: {stderr}");
    }
}

/// An exporter killed says nothing more: the receiver says the run fell
/// silent once three of its poll intervals (6 s) went by without a word,
/// and counts it.
#[test]
fn a_killed_exporter_is_counted_silent() {
    let Some(farm) = Farm::new("silent") else {
        return;
    };
    let mut server = farm.debug_server(&["--format", "none"]);
    let mut exporter = Running(Some(
        farm.xtcp(&["--frequency", "2s", "-v"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut said = Said::follow(&mut exporter);
    said.wait_for("poll 1:");
    signal(&mut exporter, Signal::SIGKILL);
    exporter.wait_at_most(Duration::from_secs(10));
    let mut heard = Said::follow(&mut server);
    heard.wait_for(&format!("{PROGRAM}: warning: run "));
    signal(&mut server, Signal::SIGTERM);
    assert!(server.wait_at_most(Duration::from_secs(10)).success());
    let stderr = heard.all();
    assert!(stderr.contains("fell silent"), "{stderr}");
    let got = |name| stopped_value(&stderr, PROGRAM, "", name);
    // The kill may have caught a second poll midway, whose tail no one
    // can know: only its first poll is certain.
    assert!(got("records") >= farm.keys.len() as u64, "{stderr}");
    assert_eq!((got("runs_heard"), got("runs_silent")), (1, 1), "{stderr}");
    assert_eq!(got("runs_stopped"), 0, "{stderr}");
}
