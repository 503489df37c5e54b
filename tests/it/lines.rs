//! Whole lines: every line a program writes to stderr (poll lines, warnings,
//! exit lines) leaves in one `write(2)`, and every text line on stdout
//! within one, so two programs writing to one terminal or pipe (`make run`)
//! never split each other's lines. Checked with strace on the real
//! programs. Needs root and strace.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{in_ns, run, workspace_bin, Alone, Need, Running, PORT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The strings of the `write`s to `fd` in an strace log (`-s` large enough
/// for whole strings, `-xx` off: `\n` as written).
fn writes(log: &str, fd: u32) -> Vec<String> {
    let call = format!("write({fd}, \"");
    log.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(&call)?;
            // `..."..., LEN) = RET`: the string ends at the last `", `.
            let (string, _) = rest.rsplit_once("\", ")?;
            Some(string.to_string())
        })
        .collect()
}

/// Runs `program args` under strace in `alone`'s namespace, tracing its
/// writes into `log`.
fn traced(alone: &Alone, log: &std::path::Path, program: &str, args: &[&str]) -> Command {
    let log = log.to_str().unwrap();
    let mut cmd = alone.exec(
        "strace",
        &["-f", "-qq", "-s", "1000000", "-e", "trace=write", "-o", log],
    );
    cmd.arg(workspace_bin(program)).args(args);
    cmd
}

#[test]
fn every_line_leaves_in_one_write() {
    let Some(alone) = Alone::new("lines", &[Need::Tool("strace")]) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("xtcp-lines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A few connections, so records and text lines there are.
    let _held = in_ns(&alone.ns, || {
        xtcp_testkit::established_pairs("127.0.0.1:40001".parse().unwrap(), 20, true).unwrap()
    });
    let server_log = dir.join("server");
    let listen = format!("127.0.0.1:{PORT}");
    let mut server = Running(Some(
        traced(
            &alone,
            &server_log,
            "xtcp-debug-server",
            &["--format", "text", "--listen", &listen],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    ));
    alone.wait_bound(PORT, &mut server);
    let dest = format!("udp:{listen}");
    let exporter_log = dir.join("exporter");
    let common = [
        "--max-loops",
        "2",
        "--frequency",
        "200ms",
        "--no-prom",
        "--no-statsd",
        "-v",
    ];
    let mut args = common.to_vec();
    args.extend(["--dest", &dest]);
    run(traced(&alone, &exporter_log, "xtcp", &args));
    // Nobody on port 9: a warning line per poll for its failed sends.
    let refused_log = dir.join("refused");
    let mut args = common.to_vec();
    args.extend(["--dest", "udp:127.0.0.1:9", "--udp-batch-bytes", "0"]);
    run(traced(&alone, &refused_log, "xtcp", &args));
    // strace is the child (`ip netns exec` execs it), the server strace's
    // child: the server is stopped, and strace ends with it.
    let strace = server.child().id();
    let children = format!("/proc/{strace}/task/{strace}/children");
    let pid: i32 = std::fs::read_to_string(children)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert!(server.wait_at_most(Duration::from_secs(10)).success());

    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap();
    let mut stderr = Vec::new();
    for log in [&exporter_log, &refused_log, &server_log] {
        stderr.extend(writes(&read(log), 2));
    }
    for line in &stderr {
        assert!(
            line.ends_with("\\n") && line.matches("\\n").count() == 1,
            "a stderr write that is not one whole line: {line:?}"
        );
    }
    for start in ["poll 1:", "poll 2:", "warning: poll 1", "xtcp: stopped:"] {
        assert!(
            stderr.iter().any(|l| l.starts_with(start)),
            "no {start:?} among {stderr:#?}"
        );
    }
    assert!(stderr
        .iter()
        .any(|l| l.starts_with("xtcp-debug-server: stopped:")));
    let stdout = writes(&read(&server_log), 1);
    assert!(stdout.len() >= 2, "{stdout:?}");
    for text in &stdout {
        assert!(
            text.ends_with("\\n"),
            "a line split across writes: {text:?}"
        );
        assert!(
            text.starts_with("ESTAB ") || text.starts_with("LISTEN "),
            "{text:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
