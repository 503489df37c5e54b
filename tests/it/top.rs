//! `xtcp-top` through a real terminal: tmux runs it inside a farm's
//! namespace where one connection of 5000 carries traffic; the captured
//! pane shows that connection on top, sorted by rate and then by bytes, and
//! `q` ends it; the pipeline's warnings keep to their own line; a service
//! is shown alone under its name. Needs root (the namespace) and tmux.

use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cgroups::{cgroup2_root, sockets_in_cgroup, TestCgroup};
use crate::common::*;

/// A tmux server of its own with one session, named after the farm's
/// namespace (tests run side by side: each sends keys to its own session
/// and kills only its own server when dropped).
struct Tmux(String);

impl Tmux {
    /// `xtcp-top` with `args` in `farm`'s namespace, on a server named
    /// after the namespace. Entered with `nsenter --net=`, which keeps the
    /// cgroup2 mount that `ip netns exec` hides.
    fn start(farm: &Farm, args: &str) -> Tmux {
        let name = format!("xtcp-top-{}", farm.ns.name());
        let command = format!(
            "nsenter --net=/run/netns/{} {} {args}",
            farm.ns.name(),
            workspace_bin("xtcp-top").display()
        );
        let started = Command::new("tmux")
            .args([
                "-L",
                &name,
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                "200",
                "-y",
                "40",
                &command,
            ])
            .status()
            .expect("tmux");
        assert!(started.success());
        Tmux(name)
    }

    fn keys(&self, keys: &str) {
        let sent = Command::new("tmux")
            .args(["-L", &self.0, "send-keys", "-t", &self.0, keys])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// The screen's lines, or `None` once the session is gone.
    fn screen(&self) -> Option<Vec<String>> {
        let out = Command::new("tmux")
            .args(["-L", &self.0, "capture-pane", "-p", "-t", &self.0])
            .output()
            .unwrap();
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
    }

    /// Presses `q` and waits at most 10 s for the program to end.
    fn quit(&self) {
        self.keys("q");
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(screen) = self.screen() {
            let screen = screen.join("\n");
            assert!(
                Instant::now() < deadline,
                "q did not end xtcp-top:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first row under the header once the view is sorted by `sort`
    /// and shows poll `min_poll` or a later one, waiting at most 10 s; the
    /// whole screen on failure.
    fn first_row(&self, sort: &str, min_poll: u64) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut screen = Vec::new();
        while Instant::now() < deadline {
            screen = self.screen().unwrap_or_default();
            let poll = screen.first().and_then(|head| {
                let after = head.split(", poll ").nth(1)?;
                after.split(',').next()?.parse::<u64>().ok()
            });
            let sorted = screen
                .first()
                .is_some_and(|head| head.contains(&format!("sorted by {sort},")));
            let row = screen.iter().skip_while(|l| !l.starts_with("NETNS")).nth(1);
            if let (true, Some(true), Some(row)) = (sorted, poll.map(|p| p >= min_poll), row) {
                return Ok(row.clone());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(screen)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .status();
    }
}

#[test]
fn the_busiest_connection_is_on_top() {
    let Some(farm) = Farm::needing("top", &[Need::Tool("tmux"), Need::Tool("nsenter")]) else {
        return;
    };
    // One connection of the farm carries traffic, client to server: one
    // from the middle, so that no tie-break puts it on top.
    let client = farm.pairs[0].streams[2000].try_clone().unwrap();
    let server = farm.pairs[0].streams[2001].try_clone().unwrap();
    let port = client.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (mut client, stop) = (client, Arc::clone(&stop));
        move || {
            let chunk = vec![7u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                if client.write_all(&chunk).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let reader = std::thread::spawn(move || {
        let mut server = server;
        let mut buf = vec![0u8; 64 << 10];
        while server.read(&mut buf).is_ok_and(|n| n > 0) {}
    });

    let top = Tmux::start(&farm, "--frequency 300ms");
    // From the third poll, rates are between two polls with traffic.
    let by_rate = top.first_row("rate", 3);
    top.keys("b");
    let by_bytes = top.first_row("bytes", 3);
    top.quit();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    drop(farm);
    reader.join().unwrap();

    let busy = format!(":{port} ");
    for (sort, row) in [("rate", by_rate), ("bytes", by_bytes)] {
        let row = row.unwrap_or_else(|s| panic!("no view sorted by {sort}:\n{}", s.join("\n")));
        assert!(
            row.contains(&busy) && row.contains("ESTAB"),
            "sorted by {sort}: {row}"
        );
        let rate: f64 = row.split_whitespace().last().unwrap().parse().unwrap();
        assert!(rate > 0.0, "{row}");
    }
}

/// Polls that take longer than the period (the farm's 10000 sockets every
/// 5 ms): the pipeline warns at every poll and sends records as fast as it
/// can. The warning shows on the line under the keys, never across the
/// table, and `q` still ends the program at once.
#[test]
fn warnings_keep_to_their_line_and_a_busy_pipeline_still_quits() {
    let Some(farm) = Farm::needing("topbusy", &[Need::Tool("tmux"), Need::Tool("nsenter")]) else {
        return;
    };
    let top = Tmux::start(&farm, "--frequency 5ms");
    let deadline = Instant::now() + Duration::from_secs(10);
    let screen = loop {
        let screen = top.screen().unwrap_or_default();
        if screen
            .get(2)
            .is_some_and(|l| l.starts_with("warning: poll "))
        {
            break screen;
        }
        let text = screen.join("\n");
        assert!(Instant::now() < deadline, "no warning line:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = screen.join("\n");
    assert!(screen[3].starts_with("NETNS"), "{text}");
    assert!(!screen[3..].iter().any(|l| l.contains("warning")), "{text}");
    top.quit();
}

/// `--service`: only the sockets of that service, named in the SERVICE
/// column. A helper in a cgroup laid out as a systemd service holds a
/// connection and its listener in the farm's namespace, beside the farm's
/// 10002 sockets (in the test's own cgroup).
#[test]
fn a_service_is_shown_alone_under_its_name() {
    let needs = [
        Need::Tool("tmux"),
        Need::Tool("nsenter"),
        Need::Tool("python3"),
    ];
    let Some(farm) = Farm::needing("topservice", &needs) else {
        return;
    };
    let unit = format!("xtcp-it-{}.service", std::process::id());
    let cgroup = TestCgroup(cgroup2_root().join(&unit));
    std::fs::create_dir(&cgroup.0).unwrap();
    // Below the farm's listeners' 40001 and the clients' ephemeral ports.
    let mut helper = sockets_in_cgroup(&cgroup.0, &farm.ns, 40501);

    let top = Tmux::start(&farm, &format!("--frequency 300ms --service {unit}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let screen = top.screen().unwrap_or_default();
        let whole = screen
            .first()
            .is_some_and(|head| head.starts_with("xtcp-top: 3 sockets"));
        let rows: Vec<String> = screen
            .iter()
            .skip_while(|l| !l.starts_with("NETNS"))
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .cloned()
            .collect();
        if whole && rows.len() == 3 {
            break rows;
        }
        assert!(Instant::now() < deadline, "{}", screen.join("\n"));
        std::thread::sleep(Duration::from_millis(100));
    };
    top.quit();
    drop(helper.stdin.take());
    helper.wait().unwrap();
    for row in &rows {
        let columns: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(columns[1], unit, "{row}");
        assert!(row.contains(":40501"), "{row}");
    }
}
