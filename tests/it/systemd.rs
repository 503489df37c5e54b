//! The service bundle: `tools/install.sh` (what `make install` runs) into a
//! temporary prefix, the installed unit checked by `systemd-analyze verify`
//! and scored by `systemd-analyze security --offline=true`, the environment
//! file read back by the exporter, the unit's system call filter checked
//! against every system call the exporter makes (traced with strace), and
//! the start's check of the buffers against the memory limit (a real
//! control group).

use crate::common::{can_run, succeeded, workspace_bin, Need};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Highest exposure accepted (systemd's scale: 0 safe .. 10 exposed).
const MAX_EXPOSURE: f64 = 2.0;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under the target dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the install script with PREFIX and SYSCONFDIR inside `root`.
fn install(root: &Path) -> String {
    let xtcp = workspace_bin("xtcp");
    let bin_dir = xtcp.parent().unwrap();
    succeeded(
        Command::new(repo().join("tools/install.sh"))
            .env("PREFIX", root.join("usr"))
            .env("SYSCONFDIR", root.join("etc"))
            .env("BIN_DIR", bin_dir)
            .output()
            .unwrap(),
        "install.sh",
    )
}

/// `systemd-analyze security --offline=true`'s overall exposure for `unit`.
fn exposure(unit: &Path) -> (f64, String) {
    let text = succeeded(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(unit)
            .output()
            .expect("systemd-analyze (package systemd)"),
        "systemd-analyze security",
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure:\n{text}"));
    let value = line
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (value, text)
}

/// `systemd-analyze verify` of units given together (a service beside the
/// socket it requires).
fn verify(units: &[&Path]) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .unwrap();
    let text = succeeded(out, "systemd-analyze verify");
    // verify exits 0 on some warnings; the units must draw none.
    for unit in units {
        let unit_name = unit.file_name().unwrap().to_str().unwrap();
        assert!(
            !text.lines().any(|l| l.contains(unit_name)),
            "systemd-analyze verify:\n{text}"
        );
    }
}

#[test]
fn installed_unit_verifies_and_is_hardened() {
    if !can_run(&[Need::Tool("systemd-analyze")]) {
        return;
    }
    let root = Scratch::new("install");
    let said = install(&root.0);
    assert!(said.contains("systemctl daemon-reload"), "{said}");
    let usr = root.0.join("usr");
    for file in [
        "bin/xtcp",
        "bin/xtcp-forwarder",
        "bin/xtcp-debug-server",
        "bin/xtcp-top",
        "lib/systemd/system/xtcp.service",
        "lib/systemd/system/xtcp-forwarder.service",
        "lib/systemd/system/xtcp-forwarder.socket",
        "lib/systemd/system/xtcp-forwarder.service.d/spool.conf",
        "share/doc/xtcp/net-admin.conf",
        "share/doc/xtcp/netns.conf",
        "share/doc/xtcp/feed-key.conf",
        "share/doc/xtcp/filter.md",
        "share/doc/xtcp/operations.md",
        "share/doc/xtcp/metrics.md",
        "share/doc/xtcp/kafka.md",
        "share/doc/xtcp/lifecycle.md",
        "share/man/man1/xtcp.1.gz",
        "share/man/man1/xtcp-forwarder.1.gz",
        "share/bash-completion/completions/xtcp",
        "share/zsh/vendor-completions/_xtcp-debug-server",
        "share/fish/vendor_completions.d/xtcp.fish",
    ] {
        assert!(usr.join(file).is_file(), "{file} not installed");
    }
    let env_file = root.0.join("etc/xtcp/xtcp.env");
    assert!(env_file.is_file());
    let unit = usr.join("lib/systemd/system/xtcp.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let prefix = usr.to_str().unwrap();
    assert!(
        text.contains(&format!("ExecStart={prefix}/bin/xtcp\n")),
        "{text}"
    );
    assert!(text.contains(&format!("EnvironmentFile={}\n", env_file.display())));
    assert!(!text.contains("/usr/local"), "a path was not rewritten");

    verify(&[&unit]);
    let (score, report) = exposure(&unit);
    assert!(score <= MAX_EXPOSURE, "exposure {score}:\n{report}");
    println!("exposure {score}");

    // The optional drop-ins, applied by hand (the offline analysis reads
    // only the file it is given).
    for (drop_in, granted) in [("net-admin", "CAP_NET_ADMIN"), ("netns", "CAP_SYS_ADMIN")] {
        let with_cap = root.0.join(format!("xtcp-{drop_in}.service"));
        let conf = repo().join(format!("bundle/systemd/{drop_in}.conf"));
        let conf = std::fs::read_to_string(conf).unwrap();
        std::fs::write(&with_cap, format!("{text}\n{conf}")).unwrap();
        verify(&[&with_cap]);
        let (with_cap_score, report) = exposure(&with_cap);
        assert!(report.contains(granted), "{report}");
        assert!(with_cap_score > score, "{granted} must cost something");
        println!("exposure with {drop_in}.conf {with_cap_score}");
    }

    // The key drop-in grants nothing: it only hands the service its key.
    let with_key = root.0.join("xtcp-feed-key.service");
    let conf = std::fs::read_to_string(repo().join("bundle/systemd/feed-key.conf")).unwrap();
    std::fs::write(&with_key, format!("{text}\n{conf}")).unwrap();
    verify(&[&with_key]);
    assert_eq!(exposure(&with_key).0, score);

    forwarder_units_verify_and_are_hardened(&root.0, &usr);

    // A second install keeps the operator's environment file.
    std::fs::write(&env_file, "XTCP_FREQUENCY=1m\n").unwrap();
    let said = install(&root.0);
    assert!(said.contains("xtcp.env.new"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&env_file).unwrap(),
        "XTCP_FREQUENCY=1m\n"
    );
}

/// The forwarder's service and socket verify together (the socket names
/// the service), the service is as hardened as the exporter's, with the
/// spool drop-in too, and its paths were rewritten.
fn forwarder_units_verify_and_are_hardened(root: &Path, usr: &Path) {
    let units = usr.join("lib/systemd/system");
    let service = units.join("xtcp-forwarder.service");
    let text = std::fs::read_to_string(&service).unwrap();
    let prefix = usr.to_str().unwrap();
    assert!(
        text.contains(&format!("ExecStart={prefix}/bin/xtcp-forwarder\n")),
        "{text}"
    );
    let env_file = root.join("etc/xtcp/forwarder.env");
    assert!(env_file.is_file());
    assert!(text.contains(&format!("EnvironmentFile=-{}\n", env_file.display())));
    assert!(!text.contains("/usr/local"), "a path was not rewritten");
    let socket = units.join("xtcp-forwarder.socket");
    verify(&[&service, &socket]);
    let (score, report) = exposure(&service);
    assert!(score <= MAX_EXPOSURE, "exposure {score}:\n{report}");
    println!("forwarder exposure {score}");
    let spool = std::fs::read_to_string(units.join("xtcp-forwarder.service.d/spool.conf")).unwrap();
    let with_spool = root.join("xtcp-forwarder-spool.service");
    std::fs::write(&with_spool, format!("{text}\n{spool}")).unwrap();
    verify(&[&with_spool, &socket]);
    assert_eq!(exposure(&with_spool).0, score);
}

/// Each `KEY=value` of the shipped environment file is a variable the
/// exporter reads, with a valid value: `--print-config` gives every one back.
#[test]
fn env_file_is_read_back_by_the_exporter() {
    let text = std::fs::read_to_string(repo().join("bundle/systemd/xtcp.env")).unwrap();
    let vars: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {l}"))
        })
        .collect();
    assert!(vars.len() >= 10, "{vars:?}");
    let out = Command::new(workspace_bin("xtcp"))
        .arg("--print-config")
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    let printed = succeeded(out, "xtcp --print-config");
    for (key, value) in &vars {
        assert!(
            printed.lines().any(|l| l == format!("{key}={value}")),
            "{key}={value} not read back:\n{printed}"
        );
    }
}

/// The names in a systemd syscall set, nested sets expanded.
fn syscall_set(name: &str, seen: &mut BTreeSet<String>) -> BTreeSet<String> {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", name])
        .output()
        .unwrap();
    let text = succeeded(out, "systemd-analyze syscall-filter");
    let mut names = BTreeSet::new();
    for entry in text.lines().skip(1).map(str::trim) {
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        if entry.starts_with('@') {
            if seen.insert(entry.to_string()) {
                names.extend(syscall_set(entry, seen));
            }
        } else {
            names.insert(entry.to_string());
        }
    }
    names
}

/// What the unit's `SystemCallFilter=` lines allow.
fn unit_allows() -> BTreeSet<String> {
    let unit = std::fs::read_to_string(repo().join("bundle/systemd/xtcp.service")).unwrap();
    let mut allowed = BTreeSet::new();
    for filter in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (deny, list) = match filter.strip_prefix('~') {
            Some(list) => (true, list),
            None => (false, filter),
        };
        for set in list.split_whitespace() {
            let names = if set.starts_with('@') {
                syscall_set(set, &mut BTreeSet::new())
            } else {
                BTreeSet::from([set.to_string()])
            };
            if deny {
                allowed.retain(|n| !names.contains(n));
            } else {
                allowed.extend(names);
            }
        }
    }
    allowed
}

/// Runs the exporter under strace, with close records, through two polls,
/// a scrape of its metrics and a SIGTERM, and checks the unit's filter allows every system
/// call it made (the filter would fail them with EPERM).
#[test]
fn syscall_filter_allows_everything_the_exporter_does() {
    if !can_run(&[
        Need::Root,
        Need::Tool("systemd-analyze"),
        Need::Tool("strace"),
    ]) {
        return;
    }
    let scratch = Scratch::new("strace");
    let trace = scratch.0.join("trace");
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(workspace_bin("xtcp"))
        .args(["--frequency", "200ms", "--prom-listen", "127.0.0.1:0", "-v"])
        .args(["--dest", "udp:127.0.0.1:9", "--statsd-dst", "127.0.0.1:9"])
        // The closer's calls too (a close comes from the scrape's socket).
        .arg("--close-records")
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace (package strace)");
    // Stderr is read on its own thread so the exporter never blocks on a
    // full pipe.
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    let mut next = || {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("exporter silent or gone: {said:?}"));
        said.push(line.clone());
        line
    };
    let addr = loop {
        if let Some(rest) = next().strip_prefix("xtcp: metrics at http://") {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    while !next().starts_with("poll 2:") {}
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // The exporter is strace's one child.
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let pid: i32 = std::fs::read_to_string(children)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());

    let trace = std::fs::read_to_string(&trace).unwrap();
    let used: BTreeSet<String> = trace
        .lines()
        .filter_map(|l| {
            // "PID name(args..." ; resumed and signal lines do not match.
            let call = l.split_once(' ')?.1.trim_start();
            let name = call.split('(').next()?;
            (call.contains('(')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .then(|| name.to_string())
        })
        .collect();
    assert!(
        used.contains("recvfrom") && used.contains("accept4"),
        "{used:?}"
    );
    let allowed = unit_allows();
    // execve happens before the filter applies (and @system-service has it).
    let refused: Vec<&String> = used.iter().filter(|n| !allowed.contains(*n)).collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter refuses {refused:?}"
    );

    // Every socket family it opened is one RestrictAddressFamilies= allows.
    let unit = std::fs::read_to_string(repo().join("bundle/systemd/xtcp.service")).unwrap();
    let families: BTreeSet<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .flat_map(str::split_whitespace)
        .collect();
    let opened: BTreeSet<&str> = trace
        .lines()
        .filter_map(|l| {
            l.split_once("socket(")
                .or_else(|| l.split_once("socketpair("))
        })
        .filter_map(|(_, args)| args.split(',').next())
        .collect();
    assert!(opened.contains("AF_NETLINK"), "{opened:?}");
    let refused: Vec<&&str> = opened.iter().filter(|f| !families.contains(*f)).collect();
    assert!(
        refused.is_empty(),
        "RestrictAddressFamilies= refuses {refused:?}"
    );
}

/// A memory control group under this process's own, removed on drop: v1
/// (`memory.limit_in_bytes`) or v2 (`memory.max`).
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn new(limit: u64) -> MemoryCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let v1 = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, path)| path.to_string()));
        let name = format!("xtcp-test-{}", std::process::id());
        let (dir, file) = match v1 {
            Some(path) => (
                Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
                "memory.limit_in_bytes",
            ),
            None => {
                let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
                (
                    Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')),
                    "memory.max",
                )
            }
        };
        let dir = dir.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = MemoryCgroup(dir);
        std::fs::write(cgroup.0.join(file), limit.to_string())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        cgroup
    }

    /// `xtcp args` run inside the group.
    fn xtcp(&self, args: &[&str]) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                self.0.display()
            ))
            .arg(workspace_bin("xtcp"))
            .args([
                "--max-loops",
                "1",
                "--dest",
                "stdout",
                "--no-prom",
                "--no-statsd",
            ])
            .args(args)
            .stdout(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Under a 64 MiB limit, buffers that may take 125.9 MiB (the one dump's
/// (500 batches + 1 netlinker + 2 inetdiagers) x 8 x 32 KiB, and two 64 KiB
/// UDP batches) stop the start with one line; the default flags (4.1 MiB
/// of buffers) poll.
#[test]
fn buffers_that_cannot_fit_the_memory_limit_do_not_start() {
    if !can_run(&[Need::Root]) {
        return;
    }
    let cgroup = MemoryCgroup::new(64 << 20);
    let out = cgroup.xtcp(&["--channel-size", "4000"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("125.9 MiB") && stderr.contains("over the 64.0 MiB memory limit"),
        "{stderr}"
    );
    let out = cgroup.xtcp(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
