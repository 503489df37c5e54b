//! The network namespaces a poll covers (`--netns`, `--all-netns`) and
//! their netlink sockets.
//!
//! A `NETLINK_SOCK_DIAG` socket dumps the namespace it was opened in, so
//! each namespace gets one socket per family, opened by a short-lived thread
//! that enters the namespace (`setns(2)`), and kept while the namespace is
//! selected. The poller calls [`Namespaces::refresh`] before every poll: it
//! finds the selected namespaces anew (a name under /run/netns, a path such
//! as /proc/PID/ns/net, or every entry of /run/netns), opens sockets for
//! namespaces it has not seen, and closes those of namespaces that are gone
//! or were replaced (same name, another inode). A socket holds its
//! namespace alive, so closing them is what lets a deleted namespace go.
//! Threads do not depend on the namespaces: the family's netlinkers read
//! every socket of the family through one epoll set.
//!
//! The same thread opens the namespace's `sockstat` files, which count its
//! TCP sockets (the kernel keeps the counts per namespace), and reads the
//! size of its TCP table. Before each poll the poller reads the counts and
//! does not dump a namespace with no TCP socket: a dump walks the whole
//! table whatever it finds, and a namespace without a table of its own
//! walks the host's (`docs/operations.md`, "Container hosts").

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::attribution;
use crate::config::NetnsSelection;
use crate::pipeline::closes::{CloseSocket, CloseState};
use crate::pipeline::family::FamilyState;
use crate::pipeline::sock_diag::SockDiagSocket;
use crate::wire::request::{AF_INET, AF_INET6, BOUND_INACTIVE};

/// Where `ip netns add` mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// The exporter's own namespace, for its inode.
const OWN_NETNS: &str = "/proc/self/ns/net";

/// A namespace being polled.
pub struct Namespace {
    /// As selected: a name under /run/netns, a `--netns` path, or "" for
    /// the exporter's own namespace.
    pub name: Arc<str>,
    pub inode: u64,
    /// One socket per family, in the order of the families.
    pub sockets: Vec<Arc<SockDiagSocket>>,
    pub table: Table,
    counts: SockStat,
}

impl Namespace {
    /// What the namespace's counts say about its TCP sockets for a poll
    /// asking for `states`; `None` when they cannot tell (read once a poll,
    /// whatever the number of dumps). Sockets that are bound but neither
    /// listening nor connected are not counted, so a poll asking for them
    /// cannot tell.
    pub fn counts(&self, states: u32) -> Option<TcpCounts> {
        if states & BOUND_INACTIVE != 0 {
            return None;
        }
        self.counts.read().ok()
    }
}

impl TcpCounts {
    /// Whether a dump of family `af` (`AF_UNSPEC`: both) may find a socket:
    /// `false` only when there is none of the family hashed and none in
    /// TIME_WAIT. An unknown count (no IPv6 in the kernel) is dumped.
    pub fn may_have(counts: Option<&TcpCounts>, af: u8) -> bool {
        let Some(counts) = counts else {
            return true;
        };
        let hashed = match af {
            AF_INET => counts.v4,
            AF_INET6 => counts.v6,
            _ => counts.v4.zip(counts.v6).map(|(a, b)| a + b),
        };
        hashed.is_none_or(|n| n > 0) || counts.time_wait > 0
    }
}

/// A namespace's TCP table: its own (`net.ipv4.tcp_child_ehash_entries` was
/// set when it was made) or the host's, shared with every namespace made
/// without one. Every dump of the namespace walks all of its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Own {
        buckets: u64,
    },
    Shared {
        buckets: u64,
    },
    /// Kernels before 6.1 have one table for all, and no sysctl to say so.
    Unknown,
}

impl Table {
    /// `net.ipv4.tcp_ehash_entries` as read inside the namespace: its
    /// table's buckets, negative when it is the host's.
    fn parse(sysctl: &str) -> Table {
        match sysctl.trim().parse::<i64>() {
            Ok(n) if n < 0 => Table::Shared {
                buckets: n.unsigned_abs(),
            },
            Ok(n) => Table::Own {
                buckets: n.unsigned_abs(),
            },
            Err(_) => Table::Unknown,
        }
    }

    /// The calling thread's namespace's.
    fn read() -> Table {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_ehash_entries")
            .map_or(Table::Unknown, |s| Table::parse(&s))
    }

    /// Every `table` label, in the metrics' order.
    pub const LABELS: [&'static str; 3] = ["own", "shared", "unknown"];

    /// Its `table` label in the metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Table::Own { .. } => "own",
            Table::Shared { .. } => "shared",
            Table::Unknown => "unknown",
        }
    }
}

/// A namespace's `/proc/net/sockstat` and `sockstat6`, opened inside it:
/// an open file keeps answering for the namespace it was opened in.
struct SockStat {
    v4: File,
    /// `None` without IPv6.
    v6: Option<File>,
}

/// TCP sockets a namespace has, per its `sockstat` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounts {
    /// Hashed (listening, connecting, connected, closing) per family;
    /// `None` when the count is not there.
    v4: Option<u64>,
    v6: Option<u64>,
    /// In TIME_WAIT, both families.
    time_wait: u64,
}

impl SockStat {
    /// The calling thread's namespace's.
    fn open() -> io::Result<SockStat> {
        let v4 = File::open("/proc/thread-self/net/sockstat")?;
        let v6 = File::open("/proc/thread-self/net/sockstat6").ok();
        Ok(SockStat { v4, v6 })
    }

    fn read(&self) -> io::Result<TcpCounts> {
        let read = |f: &File| -> io::Result<String> {
            // One page holds either file; `read_at` from 0 makes the kernel
            // write it anew.
            let mut buf = [0u8; 1024];
            let n = f.read_at(&mut buf, 0)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let v4 = read(&self.v4)?;
        let v6 = self.v6.as_ref().map(read).transpose()?;
        Ok(TcpCounts {
            v4: field(&v4, "TCP:", "inuse"),
            v6: v6.as_deref().and_then(|t| field(t, "TCP6:", "inuse")),
            time_wait: field(&v4, "TCP:", "tw").unwrap_or(0),
        })
    }
}

/// In a `sockstat` text, the number after `key` on the line that starts
/// with `line` (`TCP: inuse 3 orphan 0 tw 1 alloc 5 mem 1`).
fn field(text: &str, line: &str, key: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix(line))?;
    let mut words = rest.split_whitespace();
    while let Some(word) = words.next() {
        if word == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// A namespace to poll, before it is opened.
struct Target {
    name: String,
    /// `None`: the exporter's own namespace, opened without `setns`.
    path: Option<PathBuf>,
    /// Found by the `--all-netns` scan rather than named: if it is gone by
    /// the time it is opened, it was not missed but went away.
    found: bool,
}

pub struct Namespaces {
    selection: NetnsSelection,
    timeout: Duration,
    open: Vec<Namespace>,
    /// With `--close-records`: each namespace also gets a close socket.
    closes: Option<Arc<CloseState>>,
}

impl Namespaces {
    pub fn new(
        selection: NetnsSelection,
        timeout: Duration,
        closes: Option<Arc<CloseState>>,
    ) -> Self {
        Namespaces {
            selection,
            timeout,
            open: Vec::new(),
            closes,
        }
    }

    /// The namespaces the next poll covers, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Namespace> {
        self.open.iter()
    }

    /// Brings the open namespaces in line with the selection, registering
    /// new sockets with `families` and removing closed ones. Returns one line
    /// per namespace that could not be polled this time.
    pub fn refresh(&mut self, families: &[Arc<FamilyState>]) -> Vec<String> {
        let (targets, mut problems) = self.targets();
        let mut old: HashMap<u64, Namespace> = self.open.drain(..).map(|n| (n.inode, n)).collect();
        let mut next: Vec<Namespace> = Vec::with_capacity(targets.len());
        for target in targets {
            let found = target.found;
            let name = if target.name.is_empty() {
                "the exporter's own namespace".to_string()
            } else {
                format!("netns {}", target.name)
            };
            let path = target.path.as_deref().unwrap_or(Path::new(OWN_NETNS));
            let inode = match std::fs::metadata(path) {
                Ok(m) => m.ino(),
                Err(e) => {
                    if !(found && gone(&e)) {
                        problems.push(format!("{name}: {}: {e}", path.display()));
                    }
                    continue;
                }
            };
            // The same namespace under two names is polled once, under the
            // first.
            if next.iter().any(|n| n.inode == inode) {
                continue;
            }
            let target_name: Arc<str> = target.name.into();
            if let Some(mut ns) = old.remove(&inode) {
                if let Some(closes) = &self.closes {
                    closes.rename(inode, Arc::clone(&target_name));
                }
                ns.name = target_name;
                next.push(ns);
                continue;
            }
            let opened = open_sockets(
                target.path.as_deref(),
                families.len(),
                self.timeout,
                self.closes.as_deref(),
            );
            match opened {
                Ok(Opened {
                    dumps,
                    close,
                    counts,
                    table,
                }) => {
                    let sockets: Vec<Arc<SockDiagSocket>> =
                        dumps.into_iter().map(Arc::new).collect();
                    let registered = families
                        .iter()
                        .zip(&sockets)
                        .try_for_each(|(f, s)| f.add_socket(inode, Arc::clone(s)))
                        .and_then(|()| match (&self.closes, close) {
                            (Some(closes), Some(close)) => {
                                closes.add(inode, Arc::clone(&target_name), Arc::new(close))
                            }
                            _ => Ok(()),
                        });
                    match registered {
                        Ok(()) => next.push(Namespace {
                            name: target_name,
                            inode,
                            sockets,
                            table,
                            counts,
                        }),
                        Err(e) => {
                            self.forget(inode, families);
                            problems.push(format!("{name}: epoll: {e}"));
                        }
                    }
                }
                Err(e) if found && gone(&e) => {}
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        // Gone or replaced: their sockets close once no dump holds them.
        for inode in old.into_keys() {
            self.forget(inode, families);
        }
        self.open = next;
        problems
    }

    /// Closes the dump sockets of the namespace with this inode (once no
    /// dump holds them), so the next [`Self::refresh`] opens new ones: a
    /// socket whose dump was abandoned may still be in it.
    pub fn reopen(&mut self, inode: u64, families: &[Arc<FamilyState>]) {
        self.open.retain(|n| n.inode != inode);
        self.forget(inode, families);
    }

    /// Stops watching every socket of the namespace.
    fn forget(&self, inode: u64, families: &[Arc<FamilyState>]) {
        families.iter().for_each(|f| f.remove_socket(inode));
        if let Some(closes) = &self.closes {
            closes.remove(inode);
        }
    }

    /// What the selection names right now.
    fn targets(&self) -> (Vec<Target>, Vec<String>) {
        let mut problems = Vec::new();
        if self.selection.is_own() {
            let own = Target {
                name: String::new(),
                path: None,
                found: false,
            };
            return (vec![own], problems);
        }
        let mut targets: Vec<Target> = self
            .selection
            .names
            .iter()
            .map(|n| Target {
                name: n.clone(),
                path: Some(netns_path(n)),
                found: false,
            })
            .collect();
        if self.selection.all {
            let (found, errors) = every_namespace();
            targets.extend(found);
            problems.extend(errors);
        }
        (targets, problems)
    }
}

/// A `--netns` value: a path if it has a `/`, else a name under /run/netns.
fn netns_path(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new(NETNS_RUN_DIR).join(name_or_path)
    }
}

/// Where Docker bind-mounts the namespaces of its containers.
pub const DOCKER_NETNS_DIR: &str = "/run/docker/netns";

/// Every network namespace of the host (`--all-netns`), once each, in this
/// order: those bind-mounted under /run/netns (named by their file name)
/// and /run/docker/netns (`docker/FILE`), then those only a process holds,
/// found through `/proc/PID/ns/net` (named `container/ID` when the process's
/// control group names a container, else `pid/PID/COMMAND`, after the
/// lowest PID holding it). The exporter's own namespace comes as such
/// (named ""). Also returns the directories that could not be read.
fn every_namespace() -> (Vec<Target>, Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    let own = std::fs::metadata(OWN_NETNS).map(|m| m.ino()).ok();
    let mut targets = Vec::new();
    let mut problems = Vec::new();
    for (dir, prefix) in [(NETNS_RUN_DIR, ""), (DOCKER_NETNS_DIR, "docker/")] {
        match mounted_namespaces(Path::new(dir)) {
            Ok(names) => {
                for name in names {
                    let path = Path::new(dir).join(&name);
                    // One that cannot be read is said at the refresh.
                    let inode = std::fs::metadata(&path).map(|m| m.ino()).ok();
                    if inode.is_none_or(|i| seen.insert(i)) {
                        targets.push(Target {
                            name: format!("{prefix}{name}"),
                            path: Some(path),
                            found: true,
                        });
                    }
                }
            }
            Err(e) => problems.push(format!("--all-netns: {dir}: {e}")),
        }
    }
    for (pid, inode) in process_namespaces() {
        if !seen.insert(inode) {
            continue;
        }
        targets.push(if Some(inode) == own {
            Target {
                name: String::new(),
                path: None,
                found: true,
            }
        } else {
            Target {
                name: holder_name(pid),
                path: Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
                found: true,
            }
        });
    }
    (targets, problems)
}

/// The file names in a directory of bind-mounted namespaces, sorted; none
/// if it does not exist (nothing was ever mounted there).
fn mounted_namespaces(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        // Names that are not UTF-8 could not be recorded as a string.
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// `(pid, namespace inode)` of every process, by ascending PID. Processes
/// that exit meanwhile, or whose namespace this process may not see, are
/// passed over.
pub fn process_namespaces() -> Vec<(u32, u64)> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, u64)> = proc
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
            Some((pid, ns.ino()))
        })
        .collect();
    found.sort_unstable();
    found
}

/// What names the namespace of process `pid`: the container its control
/// group names (a 64-hex-digit id, as Docker, containerd and Kubernetes
/// make them: `container/` and the first 12), or `pid/PID/COMMAND`.
fn holder_name(pid: u32) -> String {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if let Some(id) = container_id(&cgroup) {
        return format!("container/{}", &id[..12]);
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("pid/{pid}/{}", comm.trim())
}

/// The container a `/proc/PID/cgroup` text names, in any hierarchy's path
/// (`.../docker-ID.scope`, `/docker/ID`, `cri-containerd-ID.scope`).
fn container_id(cgroup: &str) -> Option<&str> {
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/').rev())
        .find_map(attribution::container_id)
}

/// Whether opening a namespace failed because it went away after it was
/// found: its file is gone (the process exited, `ip netns del` unlinked
/// it), or no longer a namespace (`ip netns del` unmounted it and has not
/// unlinked it yet: `setns` says EINVAL).
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
    )
}

/// What is opened inside a namespace.
struct Opened {
    dumps: Vec<SockDiagSocket>,
    /// With `--close-records`.
    close: Option<CloseSocket>,
    counts: SockStat,
    table: Table,
}

/// `count` dump sockets in the namespace at `path` (`None`: this one), its
/// close socket with `closes`, its socket counts and its table. The
/// namespace is entered by a thread of its own, so no other thread moves.
fn open_sockets(
    path: Option<&Path>,
    count: usize,
    timeout: Duration,
    closes: Option<&CloseState>,
) -> io::Result<Opened> {
    let open_all = || {
        let dumps = (0..count)
            .map(|_| SockDiagSocket::open(timeout))
            .collect::<io::Result<_>>()?;
        let close = closes
            .map(|c| CloseSocket::open(&c.families, c.buffer))
            .transpose()
            .map_err(|e| io::Error::new(e.kind(), format!("joining the close groups: {e}")))?;
        let counts = SockStat::open().map_err(|e| {
            io::Error::new(e.kind(), format!("/proc/thread-self/net/sockstat: {e}"))
        })?;
        Ok(Opened {
            dumps,
            close,
            counts,
            table: Table::read(),
        })
    };
    let Some(path) = path else {
        return open_all();
    };
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("entering {}: {e}", path.display()),
                )
            })?;
            open_all()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_named_by_the_id_in_their_control_group() {
        let id = "4f0c".repeat(16);
        for cgroup in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:memory:/docker/{id}\n0::/\n"),
            format!("0::/kubepods.slice/kubepods-pod1a2b.slice/cri-containerd-{id}.scope\n"),
            format!(
                "0::/system.slice/crio-conmon-{}.scope/x\n0::/x/crio-{id}.scope\n",
                "5".repeat(64)
            ),
        ] {
            assert_eq!(container_id(&cgroup), Some(id.as_str()), "{cgroup}");
        }
        assert_eq!(container_id("0::/user.slice/session-4.scope\n"), None);
    }

    #[test]
    fn every_namespace_includes_this_one_unnamed_and_each_once() {
        let (targets, _) = every_namespace();
        let own: Vec<&Target> = targets.iter().filter(|t| t.path.is_none()).collect();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].name, "");
        let inodes: Vec<u64> = targets
            .iter()
            .map(|t| {
                let path = t.path.as_deref().unwrap_or(Path::new(OWN_NETNS));
                std::fs::metadata(path).map_or(0, |m| m.ino())
            })
            .collect();
        let unique: std::collections::HashSet<u64> = inodes.iter().copied().collect();
        assert_eq!(unique.len(), inodes.len(), "{inodes:?}");
        assert!(
            holder_name(std::process::id()).starts_with(&format!("pid/{}/", std::process::id()))
        );
    }

    #[test]
    fn a_namespace_gone_after_the_scan_is_told_from_other_failures() {
        let plain = std::env::temp_dir().join(format!("xtcp-not-a-netns-{}", std::process::id()));
        std::fs::write(&plain, b"").unwrap();
        let open = |path: &Path| open_sockets(Some(path), 1, Duration::from_secs(1), None);
        // Unmounted, not yet unlinked: a plain file.
        let unmounted = open(&plain).err().unwrap();
        std::fs::remove_file(&plain).unwrap();
        let unlinked = open(&plain).err().unwrap();
        assert!(gone(&unmounted), "{unmounted}");
        assert!(gone(&unlinked), "{unlinked}");
        let denied = io::Error::from(nix::errno::Errno::EPERM);
        assert!(!gone(&denied));
    }
}
