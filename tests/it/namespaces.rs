//! `--netns` and `--all-netns` against the real kernel while the exporter
//! runs: namespaces with known connections are created, deleted and
//! recreated between polls; every complete poll must hold exactly the
//! sockets of the namespaces that existed, each under its name and inode,
//! and the exporter's threads and descriptors must come back to what they
//! were. The exporter runs in a namespace of its own (`ip netns exec`),
//! writing JSON lines that a thread of the test reads as they come. Needs
//! root.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{
    can_run_in_netns, in_ns, metric, scrape, serial, stopped_value, workspace_bin, Key, Need,
    Running,
};
use serde_json::Value;
use xtcp_testkit::{established_pairs, Netns, Pairs};

/// What the exporter keeps open per namespace with the default layout: one
/// dump socket (both families) and the namespace's `sockstat` and
/// `sockstat6`, which tell an empty namespace.
const NAMESPACE_FDS: usize = 3;

/// The exporter's metrics port in its own namespace.
const PROM_PORT: u16 = 9000;

/// A namespace with `pairs` IPv4 connections held open.
struct Populated {
    ns: Netns,
    inode: u64,
    keys: BTreeSet<Key>,
    _pairs: Pairs,
}

impl Populated {
    fn new(tag: &str, pairs: usize) -> Populated {
        let ns = Netns::create(tag).expect("create network namespace (run the tests as root)");
        Populated::holding(ns, pairs)
    }

    /// `ns` with `pairs` connections and their listener.
    fn holding(ns: Netns, pairs: usize) -> Populated {
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, 40001));
        let held = in_ns(&ns, || established_pairs(server, pairs, false).unwrap());
        let keys: BTreeSet<Key> = held.keys().unwrap().into_iter().collect();
        assert_eq!(keys.len(), 2 * pairs + 1);
        Populated {
            inode: ns.inode().unwrap(),
            ns,
            keys,
            _pairs: held,
        }
    }

    fn name(&self) -> &str {
        self.ns.name()
    }
}

/// A namespace as one poll saw it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    inodes: BTreeSet<u64>,
    keys: BTreeSet<Key>,
}

/// Namespace name -> what one poll held of it.
type Poll = BTreeMap<String, Seen>;

/// The exporter, and the records it printed so far by poll and namespace.
struct Exporter {
    child: Running,
    pid: u32,
    polls: Arc<Mutex<BTreeMap<u64, Poll>>>,
}

impl Exporter {
    fn start(home: &Netns, flags: &[&str]) -> Exporter {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", home.name()])
            .arg(workspace_bin("xtcp"))
            .args(["--frequency", "200ms", "--dest", "stdout"])
            .args(["--prom-listen", &format!("127.0.0.1:{PROM_PORT}")])
            .args(["--no-statsd"])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Running(Some(cmd.spawn().unwrap()));
        // `ip netns exec` execs the program: the child is the exporter.
        let pid = child.child().id();
        let stdout = child.child().stdout.take().unwrap();
        let polls: Arc<Mutex<BTreeMap<u64, Poll>>> = Arc::default();
        std::thread::spawn({
            let polls = Arc::clone(&polls);
            move || {
                for line in BufReader::new(stdout).lines() {
                    let r: Value = serde_json::from_str(&line.unwrap()).unwrap();
                    let u = |k: &str| r[k].as_u64().unwrap();
                    let key = (
                        u("inet_diag_msg_family") as u32,
                        u("inet_diag_msg_socket_source_port") as u16,
                        u("inet_diag_msg_socket_destination_port") as u16,
                    );
                    let name = r["netns_name"].as_str().unwrap().to_string();
                    let ours = !name.is_empty() && !name.starts_with("container/");
                    let mut polls = polls.lock().unwrap();
                    let seen: &mut Seen = polls
                        .entry(u("poll_id"))
                        .or_default()
                        .entry(name)
                        .or_default();
                    seen.inodes.insert(u("netns_inode"));
                    // The host's own namespaces (`--all-netns`) may hold two
                    // sockets with the same ports on other addresses.
                    assert!(
                        seen.keys.insert(key) || !ours,
                        "a socket twice in a poll: {key:?}"
                    );
                }
            }
        });
        Exporter { child, pid, polls }
    }

    /// Waits for a complete poll (a later one has begun: polls do not
    /// overlap) that started after now, and returns what it held of the
    /// namespaces named `ours`.
    fn next_poll(&self, ours: &[&str]) -> Poll {
        let after = self
            .polls
            .lock()
            .unwrap()
            .keys()
            .last()
            .copied()
            .unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let mut polls = self.polls.lock().unwrap();
                let last = polls.keys().last().copied().unwrap_or(0);
                // `after` may still have been filling; `after + 1` started
                // after this call, and `last > after + 1` means it is whole.
                if last > after + 1 {
                    let mut poll = polls.remove(&(after + 1)).unwrap_or_default();
                    poll.retain(|name, _| ours.contains(&name.as_str()));
                    return poll;
                }
            }
            assert!(Instant::now() < deadline, "no complete poll after {after}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (open descriptors, threads) of the exporter.
    fn footprint(&self) -> (usize, usize) {
        let count = |dir: &str| {
            std::fs::read_dir(format!("/proc/{}/{dir}", self.pid))
                .unwrap()
                .count()
        };
        (count("fd"), count("task"))
    }

    fn stop(self) -> String {
        let (status, stderr) = self.child.terminate();
        assert!(status.success(), "{status:?}: {stderr}");
        stderr
    }
}

fn expect(namespaces: &[&Populated]) -> Poll {
    namespaces
        .iter()
        .map(|p| {
            let seen = Seen {
                inodes: [p.inode].into(),
                keys: p.keys.clone(),
            };
            (p.name().to_string(), seen)
        })
        .collect()
}

#[test]
fn named_namespaces_missing_appearing_deleted_and_recreated() {
    if !can_run_in_netns(&[]) {
        return;
    }
    // One test at a time: `--all-netns` sees every namespace of the host.
    let _serial = serial();
    let home = Netns::create("nshome").unwrap();
    let a = Populated::new("nsa", 5);
    // Named before it exists: counted as missing until it appears.
    let b_name = format!("xtcp-nsb-{}", std::process::id());
    let a_name = a.name().to_string();
    let ours = [a_name.as_str(), b_name.as_str()];
    let exporter = Exporter::start(&home, &["--netns", &a_name, "--netns", &b_name]);

    assert_eq!(exporter.next_poll(&ours), expect(&[&a]));
    let (fds, threads) = exporter.footprint();

    let b = Populated::new("nsb", 7);
    assert_eq!(b.name(), b_name);
    assert_eq!(exporter.next_poll(&ours), expect(&[&a, &b]));
    // One namespace's descriptors more, no thread.
    assert_eq!(exporter.footprint(), (fds + NAMESPACE_FDS, threads));

    drop(a);
    assert_eq!(exporter.next_poll(&ours), expect(&[&b]));
    assert_eq!(
        exporter.footprint(),
        (fds, threads),
        "sockets of the deleted namespace"
    );

    // The same name again is another namespace: another inode, other sockets.
    let a2 = Populated::new("nsa", 3);
    assert_eq!(a2.name(), a_name);
    assert_eq!(exporter.next_poll(&ours), expect(&[&a2, &b]));
    assert_eq!(exporter.footprint(), (fds + NAMESPACE_FDS, threads));

    let stderr = exporter.stop();
    assert!(
        stderr.contains(&format!(
            "warning: poll 1: netns {b_name}: /run/netns/{b_name}: "
        )),
        "{stderr}"
    );
    assert!(
        stopped_value(&stderr, "xtcp", "", "netns_errors") >= 2,
        "{stderr}"
    );
}

#[test]
fn all_netns_follows_run_netns() {
    if !can_run_in_netns(&[]) {
        return;
    }
    // One test at a time: `--all-netns` sees every namespace of the host.
    let _serial = serial();
    // Polls are seen through their records: the exporter's namespace, one
    // of those under /run/netns, holds a listener so none is empty.
    let home = Populated::new("allhome", 0);
    let c_name = format!("xtcp-allc-{}", std::process::id());
    let d_name = format!("xtcp-alld-{}", std::process::id());
    let ours = [c_name.as_str(), d_name.as_str()];
    let exporter = Exporter::start(&home.ns, &["--all-netns"]);

    assert_eq!(exporter.next_poll(&ours), expect(&[]));
    let (fds, threads) = exporter.footprint();

    let c = Populated::new("allc", 4);
    let d = Populated::new("alld", 2);
    assert_eq!(exporter.next_poll(&ours), expect(&[&c, &d]));
    assert_eq!(exporter.footprint(), (fds + 2 * NAMESPACE_FDS, threads));

    drop(c);
    drop(d);
    assert_eq!(exporter.next_poll(&ours), expect(&[]));
    assert_eq!(exporter.footprint(), (fds, threads));

    let stderr = exporter.stop();
    assert_eq!(
        stopped_value(&stderr, "xtcp", "", "netns_errors"),
        0,
        "{stderr}"
    );
}

/// A namespace only a process holds: `unshare -n` running a listener on
/// 127.0.0.1:4444, until dropped.
struct Unshared {
    child: Running,
    pid: u32,
    inode: u64,
}

impl Unshared {
    fn start() -> Unshared {
        let script = "import os, socket, sys, time\n\
            os.system('ip link set lo up')\n\
            s = socket.socket(); s.bind(('127.0.0.1', 4444)); s.listen()\n\
            print('ready', flush=True); time.sleep(600)";
        let mut child = Running(Some(
            Command::new("unshare")
                .args(["-n", "python3", "-c", script])
                .stdout(Stdio::piped())
                .spawn()
                .expect("unshare (util-linux)"),
        ));
        let stdout = child.child().stdout.take().unwrap();
        let ready = BufReader::new(stdout).lines().next();
        assert!(
            matches!(ready, Some(Ok(ref l)) if l == "ready"),
            "{ready:?}"
        );
        // unshare execs python3: the child holds the namespace.
        let pid = child.child().id();
        let inode = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        Unshared { child, pid, inode }
    }
}

/// Docker's directory of namespaces, made a shared mount point as Docker
/// and `ip netns` make theirs, so a mount in it reaches the exporter's mount
/// namespace (`ip netns exec` makes one of its own); undone when dropped.
struct DockerDir {
    dir: std::path::PathBuf,
    /// The directories made here, innermost first.
    made: Vec<std::path::PathBuf>,
}

impl DockerDir {
    fn prepare() -> DockerDir {
        let dir = std::path::PathBuf::from("/run/docker/netns");
        let made = dir
            .ancestors()
            .take_while(|d| !d.exists())
            .map(std::path::Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(&dir).unwrap();
        for args in [&["--bind", "--make-private"][..], &["--make-shared"]] {
            let mut mount = Command::new("mount");
            if args[0] == "--bind" {
                mount.arg("--bind").arg(&dir).arg(&dir);
            } else {
                mount.args(args).arg(&dir);
            }
            assert!(mount.status().unwrap().success(), "mount {args:?}");
        }
        DockerDir { dir, made }
    }
}

impl Drop for DockerDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        for dir in &self.made {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A namespace bind-mounted under Docker's directory only, with a listener
/// on 127.0.0.1:5555 held by the test; unmounted when dropped.
struct DockerStyle {
    path: std::path::PathBuf,
    inode: u64,
    _listener: std::net::TcpListener,
}

impl DockerStyle {
    fn new(dir: &DockerDir) -> DockerStyle {
        let path = dir.dir.join(format!("xtcp-dock-{}", std::process::id()));
        let tmp = Netns::create("docktmp").unwrap();
        std::fs::File::create(&path).unwrap();
        let mounted = Command::new("mount")
            .arg("--bind")
            .arg(format!("/run/netns/{}", tmp.name()))
            .arg(&path)
            .status()
            .unwrap();
        assert!(mounted.success());
        // Only the Docker-style mount holds it now.
        drop(tmp);
        let ns = std::fs::File::open(&path).unwrap();
        let listener = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let up = Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status();
                assert!(up.unwrap().success());
                std::net::TcpListener::bind("127.0.0.1:5555").unwrap()
            })
            .join()
            .unwrap()
        });
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        DockerStyle {
            path,
            inode,
            _listener: listener,
        }
    }

    fn name(&self) -> String {
        format!(
            "docker/{}",
            self.path.file_name().unwrap().to_str().unwrap()
        )
    }
}

impl Drop for DockerStyle {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `--all-netns` finds a namespace under /run/netns, one bind-mounted under
/// Docker's directory and one only a process holds, names each, and lets
/// each go when it goes.
#[test]
fn all_netns_finds_namespaces_held_by_mounts_and_processes() {
    if !can_run_in_netns(&[Need::Tool("unshare"), Need::Tool("mount")]) {
        return;
    }
    let _serial = serial();
    let home = Populated::new("anyhome", 0);
    let docker_dir = DockerDir::prepare();
    let exporter = Exporter::start(&home.ns, &["--all-netns"]);
    let named = Populated::new("anyrun", 2);
    let docker = DockerStyle::new(&docker_dir);
    let unshared = Unshared::start();
    let held = format!("pid/{}/python3", unshared.pid);
    let (named_name, docker_name) = (named.name().to_string(), docker.name());
    let ours = [named_name.as_str(), &docker_name, &held];
    // Let the exporter settle on what it found before counting its files.
    exporter.next_poll(&ours);
    let (fds, threads) = exporter.footprint();

    let mut want = expect(&[&named]);
    for (name, inode, port) in [
        (docker.name(), docker.inode, 5555),
        (held.clone(), unshared.inode, 4444),
    ] {
        let seen = Seen {
            inodes: [inode].into(),
            keys: [(libc::AF_INET as u32, port, 0)].into(),
        };
        want.insert(name, seen);
    }
    assert_eq!(exporter.next_poll(&ours), want);

    drop(unshared.child);
    drop(docker);
    drop(named);
    assert_eq!(exporter.next_poll(&ours), expect(&[]));
    // Three namespaces' descriptors gone, no thread more or less.
    assert_eq!(exporter.footprint(), (fds - 3 * NAMESPACE_FDS, threads));
    let stderr = exporter.stop();
    assert_eq!(
        stopped_value(&stderr, "xtcp", "", "netns_errors"),
        0,
        "{stderr}"
    );
}

/// A container host: namespaces made inside a parent namespace whose
/// `tcp_child_ehash_entries` decides their table (0: the host's; 16: their
/// own), one of them empty. The exporter dumps exactly the sockets of the
/// populated ones, does not dump the empty one until it has a socket, says
/// which table each has, and warns once that the shared tables take the
/// dump time; with 2 netlinkers (dumps side by side) the sockets are the
/// same.
#[test]
fn container_host_dumps_only_what_has_sockets_and_knows_each_table() {
    if !can_run_in_netns(&[Need::Tool("nsenter")]) {
        return;
    }
    let _serial = serial();
    let home = Netns::create("chhome").unwrap();
    let parent = Netns::create("chparent").unwrap();
    parent
        .sysctl("net.ipv4.tcp_child_ehash_entries", "0")
        .unwrap();
    let shared = Populated::holding(Netns::create_in(&parent, "chshared").unwrap(), 4);
    let empty = Netns::create_in(&parent, "chempty").unwrap();
    parent
        .sysctl("net.ipv4.tcp_child_ehash_entries", "16")
        .unwrap();
    let own = Populated::holding(Netns::create_in(&parent, "chown").unwrap(), 3);
    let names = [shared.name(), empty.name(), own.name()];
    let selected = names.join(",");

    for netlinkers in ["1", "2"] {
        let exporter = Exporter::start(
            &home,
            &[
                "--netns",
                &selected,
                "--netlinkers4",
                netlinkers,
                "--netlinkers6",
                netlinkers,
            ],
        );
        assert_eq!(exporter.next_poll(&names), expect(&[&shared, &own]));
        let body = scrape(&home, PROM_PORT);
        let value = |name: &str| metric::<f64>(&body, name);
        assert_eq!(value("xtcp_netns"), Some(3.0), "{body}");
        assert_eq!(value("xtcp_netns_empty"), Some(1.0), "{body}");
        assert_eq!(value("xtcp_netns_tables{table=\"own\"}"), Some(1.0));
        assert_eq!(value("xtcp_netns_tables{table=\"shared\"}"), Some(2.0));
        assert_eq!(value("xtcp_netns_tables{table=\"unknown\"}"), Some(0.0));
        for table in ["shared", "other"] {
            let seconds = value(&format!(
                "xtcp_netns_dump_seconds_total{{table=\"{table}\"}}"
            ));
            assert!(seconds.is_some_and(|s| s > 0.0), "{table}: {body}");
        }
        let stderr = exporter.stop();
        let warnings = stderr.matches("share the host's TCP table").count();
        assert_eq!(warnings, 1, "{stderr}");
        assert!(stderr.contains("1 of 2 namespaces dumped"), "{stderr}");
    }

    // A socket in the empty namespace: dumped from the next poll on.
    let exporter = Exporter::start(&home, &["--netns", &selected]);
    assert_eq!(exporter.next_poll(&names), expect(&[&shared, &own]));
    let listener = in_ns(&empty, || {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 40001)).unwrap()
    });
    let port = listener.local_addr().unwrap().port();
    let poll = exporter.next_poll(&names);
    let seen = &poll[empty.name()];
    assert_eq!(seen.keys, [(2, port, 0)].into());
    assert_eq!(seen.inodes, [empty.inode().unwrap()].into());
    exporter.stop();
}
