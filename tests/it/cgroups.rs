//! Whose connection: every record's cgroup path against `ss -e`, socket by
//! socket. Socket farms run in cgroups the test makes under the host's
//! cgroup2 root (found from the mount table, as the exporter finds it):
//! one named like a Docker container's scope, and the root cgroup itself.
//! The exporter polls their namespaces with `--netns` from the host's mount
//! namespace (`ip netns exec` would hide the cgroup2 mount), and `ss` runs
//! in each through `nsenter --net=`, which keeps it. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{can_run_in_netns, metric, scrape_at, serial, workspace_bin, Need};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use xtcp::attribution::find_cgroup2_root;
use xtcp_testkit::Netns;

/// A socket as both sides print it: (local, peer) as `ADDR:PORT`, IPv6 in
/// brackets.
type Endpoints = (String, String);

/// A cgroup the test made, removed on drop (once its processes are gone).
pub(crate) struct TestCgroup(pub(crate) PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The farm's processes leave it as they exit, just before.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `xtcp-socket-farm` started inside a cgroup (its workers follow); on
/// drop, even in a failing test, its stdin closes and it deletes its
/// namespace and exits.
struct CgroupFarm {
    child: Child,
    ns: String,
}

impl Drop for CgroupFarm {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The farm started inside the cgroup `dir`.
fn farm_in(dir: &Path, tag: &str) -> CgroupFarm {
    let mut cmd = Command::new(workspace_bin("xtcp-socket-farm"));
    cmd.args(["--netns", tag, "--pairs", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    in_cgroup(&mut cmd, dir);
    let mut child = cmd.spawn().unwrap();
    let line = first_line(&mut child);
    let ns = line.split_whitespace().nth(1).map(str::to_string);
    let farm = CgroupFarm {
        child,
        ns: ns.unwrap_or_default(),
    };
    assert!(!farm.ns.is_empty(), "the farm did not start: {line}");
    farm
}

/// The first line `child` prints: that it is ready.
pub(crate) fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

/// Where cgroup2 is mounted, found as the exporter finds it.
pub(crate) fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    find_cgroup2_root(&mountinfo).expect("a cgroup2 mount")
}

/// Makes `cmd`'s process start in the cgroup `dir` (its children follow).
pub(crate) fn in_cgroup(cmd: &mut Command, dir: &Path) {
    let procs = dir
        .join("cgroup.procs")
        .into_os_string()
        .into_encoded_bytes();
    let procs = std::ffi::CString::new(procs).unwrap();
    // SAFETY: between fork and exec only open(2), write(2) and close(2),
    // which are async-signal-safe, on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
}

/// The lines of `ss OPTIONS` run in `ns` through `nsenter --net=`.
fn ss_lines(ns: &str, options: &str) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["ss", options])
        .output()
        .unwrap();
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `ss -taneH` in `ns`: every socket's endpoints and the path after
/// `cgroup:`.
fn ss_cgroups(ns: &str) -> BTreeMap<Endpoints, String> {
    ss_lines(ns, "-taneH")
        .iter()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let cgroup = words
                .iter()
                .find_map(|w| w.strip_prefix("cgroup:"))
                .unwrap_or_else(|| panic!("no cgroup in `{line}`"));
            let endpoints = (words[3].to_string(), words[4].to_string());
            (endpoints, cgroup.to_string())
        })
        .collect()
}

/// `ADDR:PORT` as ss prints it (`ADDR:*` for a listener's peer).
fn endpoint(ip: &str, port: u64) -> String {
    let port = if port == 0 {
        "*".to_string()
    } else {
        port.to_string()
    };
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// One poll of the namespaces (`xtcp --once`, JSON, with `flags`): its
/// records.
fn xtcp_once(namespaces: &[&str], flags: &[&str]) -> Vec<Value> {
    let out = Command::new(workspace_bin("xtcp"))
        .args([
            "--once",
            "--format",
            "json",
            "--netns",
            &namespaces.join(","),
        ])
        .args(flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "xtcp: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// A record's string field, "" when absent.
fn text(r: &Value, k: &str) -> String {
    r[k].as_str().unwrap_or_default().to_string()
}

/// A record's socket as `ss` prints its endpoints.
fn endpoints_of(r: &Value) -> Endpoints {
    let port = |k: &str| r[k].as_u64().unwrap_or(0);
    (
        endpoint(
            &text(r, "inet_diag_msg_socket_source"),
            port("inet_diag_msg_socket_source_port"),
        ),
        endpoint(
            &text(r, "inet_diag_msg_socket_destination"),
            port("inet_diag_msg_socket_destination_port"),
        ),
    )
}

/// One poll of the namespaces: each namespace's sockets and the owner
/// fields of their records.
fn xtcp_owners(
    namespaces: &[&str],
    flags: &[&str],
) -> BTreeMap<String, BTreeMap<Endpoints, [String; 4]>> {
    let mut by_ns: BTreeMap<String, BTreeMap<Endpoints, [String; 4]>> = BTreeMap::new();
    for r in xtcp_once(namespaces, flags) {
        let owner = ["cgroup_path", "systemd_unit", "container_id", "pod_uid"].map(|k| text(&r, k));
        let seen = by_ns.entry(text(&r, "netns_name")).or_default();
        assert!(seen.insert(endpoints_of(&r), owner).is_none(), "{r}");
    }
    by_ns
}

#[test]
fn every_record_carries_the_cgroup_path_ss_prints_and_filters_by() {
    if !can_run_in_netns(&[Need::Tool("ss"), Need::Tool("nsenter")]) {
        return;
    }
    let _serial = serial();
    let root = cgroup2_root();
    let id = "c0ffee".repeat(10) + "c0de";
    let slice_name = format!("xtcp-it-{}.slice", std::process::id());
    let slice = TestCgroup(root.join(&slice_name));
    std::fs::create_dir(&slice.0).unwrap();
    let scope = TestCgroup(slice.0.join(format!("docker-{id}.scope")));
    let service = TestCgroup(slice.0.join("xtcp-it.service"));
    for cgroup in [&scope, &service] {
        std::fs::create_dir(&cgroup.0).unwrap();
    }

    // (farm, its cgroup's path, [unit, container]) for a container, a
    // systemd service and the root cgroup.
    let cases = [
        (
            farm_in(&scope.0, "cgcontainer"),
            format!("/{slice_name}/docker-{id}.scope"),
            [String::new(), id.clone()],
        ),
        (
            farm_in(&service.0, "cgservice"),
            format!("/{slice_name}/xtcp-it.service"),
            ["xtcp-it.service".to_string(), String::new()],
        ),
        (
            farm_in(&root, "cgroot"),
            "/".to_string(),
            [String::new(), String::new()],
        ),
    ];
    let namespaces: Vec<&str> = cases.iter().map(|(farm, _, _)| farm.ns.as_str()).collect();
    let owners = xtcp_owners(&namespaces, &[]);
    for (farm, path, [unit, container_id]) in &cases {
        let records = &owners[farm.ns.as_str()];
        let ss = ss_cgroups(&farm.ns);
        // 3 connections per family, both ends, and a listener per family.
        assert_eq!(ss.len(), 14, "{ss:?}");
        let paths: BTreeMap<&Endpoints, &str> =
            records.iter().map(|(k, o)| (k, o[0].as_str())).collect();
        let expected: BTreeMap<&Endpoints, &str> =
            ss.iter().map(|(k, p)| (k, p.as_str())).collect();
        assert_eq!(paths, expected, "{path}");
        assert!(ss.values().all(|p| p == path), "{ss:?}");
        let want = [
            path.clone(),
            unit.clone(),
            container_id.clone(),
            String::new(),
        ];
        assert!(records.values().all(|owner| owner == &want), "{records:?}");
    }

    // `--filter cgroup PATH`: the kernel returns exactly the sockets `ss -e`
    // put in that cgroup above, as `ss ... cgroup PATH` does (which cannot
    // name the root cgroup).
    for (_, path, _) in &cases {
        let filter = format!("cgroup {path}");
        let filtered = xtcp_owners(&namespaces, &["--filter", &filter]);
        for ns in &namespaces {
            let got: Vec<&Endpoints> = filtered
                .get(*ns)
                .map(|r| r.keys().collect())
                .unwrap_or_default();
            let want: Vec<&Endpoints> = owners[*ns]
                .iter()
                .filter(|(_, owner)| &owner[0] == path)
                .map(|(k, _)| k)
                .collect();
            assert_eq!(got, want, "{filter} in {ns}");
            if path != "/" {
                let out = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(["ss", "-tanH", "cgroup", path])
                    .output()
                    .unwrap();
                let ss = String::from_utf8(out.stdout).unwrap();
                assert_eq!(ss.lines().count(), want.len(), "{filter} in {ns}: {ss}");
            }
        }
    }
}

/// A helper in the cgroup `dir` holding one connection to `port` and its
/// listener (three sockets) in `ns` until its stdin closes.
pub(crate) fn sockets_in_cgroup(dir: &Path, ns: &Netns, port: u16) -> Child {
    let hold = format!(
        "import socket, sys
l = socket.socket(); l.bind(('127.0.0.1', {port})); l.listen()
c = socket.create_connection(('127.0.0.1', {port})); a, _ = l.accept()
print('ready', flush=True); sys.stdin.read()"
    );
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name()))
        .args(["python3", "-c", &hold])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    in_cgroup(&mut cmd, dir);
    let mut child = cmd.spawn().unwrap();
    assert_eq!(first_line(&mut child).trim(), "ready");
    child
}

/// The exporter polling `ns` every 200 ms with `--cgroup-rescan rescan`;
/// after its first poll, sockets appear in a cgroup made since. With a
/// short rescan the first record that misses walks the tree once and every
/// record carries the new path; with a long one none does, and every
/// record is a miss. Counted in the metrics either way.
#[test]
fn a_cgroup_made_after_the_start_is_found_by_one_walk_when_due() {
    if !can_run_in_netns(&[Need::Tool("nsenter"), Need::Tool("python3")]) {
        return;
    }
    let _serial = serial();
    let root = cgroup2_root();
    for (rescan, found) in [("1ms", true), ("1h", false)] {
        // A namespace of its own: the last run's connection lingers in
        // TIME_WAIT.
        let ns = Netns::create(&format!("cgnew{found}")).unwrap();
        let mut exporter = Command::new(workspace_bin("xtcp"))
            .args([
                "--netns",
                ns.name(),
                "--frequency",
                "200ms",
                "--cgroup-rescan",
                rescan,
            ])
            .args([
                "--dest",
                "stdout",
                "--prom-listen",
                "127.0.0.1:0",
                "--no-statsd",
                "-v",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(exporter.stderr.take().unwrap());
        let mut metrics = None;
        let mut line = String::new();
        while !line.starts_with("poll 1:") {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
            if let Some(rest) = line.strip_prefix("xtcp: metrics at http://") {
                metrics = rest.split('/').next().map(str::to_string);
            }
        }
        let cgroup = TestCgroup(root.join(format!("xtcp-it-new-{}.scope", std::process::id())));
        std::fs::create_dir(&cgroup.0).unwrap();
        let mut helper = sockets_in_cgroup(&cgroup.0, &ns, 40001);
        let path = format!("/{}", cgroup.0.file_name().unwrap().to_string_lossy());

        // Two whole polls with the helper's sockets.
        let mut polls: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for line in BufReader::new(exporter.stdout.take().unwrap()).lines() {
            let r: Value = serde_json::from_str(&line.unwrap()).unwrap();
            let poll = r["poll_id"].as_u64().unwrap();
            let cgroup_path = r["cgroup_path"].as_str().unwrap_or_default().to_string();
            polls.entry(poll).or_default().push(cgroup_path);
            if polls.values().filter(|p| p.len() == 3).count() > 2 {
                break;
            }
        }
        let whole: Vec<&Vec<String>> = polls.values().filter(|p| p.len() == 3).take(2).collect();
        let want = if found { path.as_str() } else { "" };
        for poll in &whole {
            assert!(poll.iter().all(|p| p == want), "{rescan}: {poll:?}");
        }
        let body = scrape_at(metrics.as_deref().expect("metrics announced"));
        let value = |name: &str| metric::<u64>(&body, name).unwrap();
        let (walks, misses) = (
            value("xtcp_cgroup_walks_total"),
            value("xtcp_cgroup_misses_total"),
        );
        if found {
            // The first record that missed walked; the rest found it.
            assert_eq!((walks, misses), (2, 1), "{body}");
        } else {
            // Every record of every poll that saw them missed, no walk.
            assert_eq!(walks, 1, "{body}");
            assert!(misses >= 6, "{misses}");
        }
        kill(Pid::from_raw(exporter.id() as i32), Signal::SIGTERM).unwrap();
        assert!(exporter.wait().unwrap().success());
        drop(helper.stdin.take());
        helper.wait().unwrap();
    }
}

/// Under `ip netns exec`, which remounts /sys and so hides the cgroup2
/// mount, the exporter says once that records carry no path, and polls.
#[test]
fn a_hidden_cgroup_tree_is_said_once() {
    if !can_run_in_netns(&[]) {
        return;
    }
    let _serial = serial();
    let ns = Netns::create("cghidden").unwrap();
    let out = ns
        .exec(workspace_bin("xtcp"), &["--once"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(
        warnings,
        [
            "xtcp: warning: no cgroup2 file system is mounted: records carry no cgroup path \
          (--no-cgroup-paths leaves them out without this warning)"
        ],
        "{stderr}"
    );
}

/// `ss -tanpH` in `ns`: every socket's endpoints and the PIDs and commands
/// of its `users:(("COMMAND",pid=N,fd=M),...)`, empty for none.
fn ss_processes(ns: &str) -> BTreeMap<Endpoints, BTreeSet<(u32, String)>> {
    ss_lines(ns, "-tanpH")
        .iter()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let endpoints = (words[3].to_string(), words[4].to_string());
            let users = line.split_once("users:(").map_or("", |(_, u)| u);
            let holders = users
                .split("(\"")
                .skip(1)
                .map(|user| {
                    let (command, rest) = user.split_once("\",pid=").unwrap();
                    let pid = rest.split(',').next().unwrap().parse().unwrap();
                    (pid, command.to_string())
                })
                .collect();
            (endpoints, holders)
        })
        .collect()
}

/// A helper holding, in `ns`, a listener and both ends of a connection,
/// shared with a child it forked (two holders each), and a TIME_WAIT
/// socket (no process).
fn shared_and_time_wait(ns: &Netns, port: u16) -> Child {
    let hold = format!(
        "import os, socket, sys
l = socket.socket(); l.bind(('127.0.0.1', {port})); l.listen()
c = socket.create_connection(('127.0.0.1', {port})); a, _ = l.accept()
c.close(); a.close()
c = socket.create_connection(('127.0.0.1', {port})); a, _ = l.accept()
if os.fork() == 0:
    sys.stdin.read(); os._exit(0)
print('ready', flush=True); sys.stdin.read(); os.wait()"
    );
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .args(["python3", "-c", &hold])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(first_line(&mut child).trim(), "ready");
    child
}

/// `--processes` against `ss -p`, socket by socket: a farm's worker
/// processes, sockets two processes share, and a TIME_WAIT socket, which
/// has no process and says so.
#[test]
fn records_name_the_processes_ss_names() {
    if !can_run_in_netns(&[
        Need::Tool("ss"),
        Need::Tool("nsenter"),
        Need::Tool("python3"),
    ]) {
        return;
    }
    let _serial = serial();
    let farm = farm_in(&cgroup2_root(), "procfarm");
    let ns = Netns::create("procshared").unwrap();
    let mut helper = shared_and_time_wait(&ns, 40001);
    for name in [farm.ns.as_str(), ns.name()] {
        let mut records = BTreeMap::new();
        for r in xtcp_once(&[name], &["--processes"]) {
            let holders: BTreeSet<(u32, String)> = text(&r, "processes")
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| {
                    let (pid, command) = h.split_once('/').unwrap();
                    (pid.parse().unwrap(), command.to_string())
                })
                .collect();
            let owner = text(&r, "process_owner");
            let want_owner = if holders.is_empty() {
                "PROCESS_OWNER_NONE"
            } else {
                "PROCESS_OWNER_FOUND"
            };
            assert_eq!(owner, want_owner, "{r}");
            assert_eq!(
                r["process_count"].as_u64().unwrap_or(0) as usize,
                holders.len(),
                "{r}"
            );
            records.insert(endpoints_of(&r), holders);
        }
        let ss = ss_processes(name);
        assert_eq!(records, ss, "{name}");
        if name == ns.name() {
            // The listener and the connection's two ends, shared by the
            // fork; the TIME_WAIT socket, nobody's.
            let counts: Vec<usize> = ss.values().map(BTreeSet::len).collect();
            assert_eq!(counts.iter().filter(|&&n| n == 2).count(), 3, "{ss:?}");
            assert_eq!(counts.iter().filter(|&&n| n == 0).count(), 1, "{ss:?}");
        }
    }
    drop(helper.stdin.take());
    helper.wait().unwrap();
}
