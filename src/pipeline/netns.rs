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

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::config::NetnsSelection;
use crate::pipeline::closes::{CloseSocket, CloseState};
use crate::pipeline::family::FamilyState;
use crate::pipeline::sock_diag::SockDiagSocket;

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
}

/// A namespace to poll, before it is opened.
struct Target {
    name: String,
    /// `None`: the exporter's own namespace, opened without `setns`.
    path: Option<PathBuf>,
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
            let name = if target.name.is_empty() {
                "the exporter's own namespace".to_string()
            } else {
                format!("netns {}", target.name)
            };
            let path = target.path.as_deref().unwrap_or(Path::new(OWN_NETNS));
            let inode = match std::fs::metadata(path) {
                Ok(m) => m.ino(),
                Err(e) => {
                    problems.push(format!("{name}: {}: {e}", path.display()));
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
                Ok((sockets, close)) => {
                    let sockets: Vec<Arc<SockDiagSocket>> =
                        sockets.into_iter().map(Arc::new).collect();
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
                        }),
                        Err(e) => {
                            self.forget(inode, families);
                            problems.push(format!("{name}: epoll: {e}"));
                        }
                    }
                }
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
            })
            .collect();
        if self.selection.all {
            match named_namespaces() {
                Ok(names) => targets.extend(names.into_iter().map(|n| Target {
                    path: Some(netns_path(&n)),
                    name: n,
                })),
                Err(e) => problems.push(format!("--all-netns: {NETNS_RUN_DIR}: {e}")),
            }
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

/// The names under /run/netns, sorted; none if it does not exist (no
/// namespace was ever named on this host).
fn named_namespaces() -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
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

/// `count` dump sockets in the namespace at `path` (`None`: this one), and
/// its close socket with `closes`. The namespace is entered by a thread of
/// its own, so no other thread moves.
fn open_sockets(
    path: Option<&Path>,
    count: usize,
    timeout: Duration,
    closes: Option<&CloseState>,
) -> io::Result<(Vec<SockDiagSocket>, Option<CloseSocket>)> {
    let open_all = || {
        let dumps = (0..count)
            .map(|_| SockDiagSocket::open(timeout))
            .collect::<io::Result<_>>()?;
        let close = closes
            .map(|c| CloseSocket::open(&c.families, c.buffer))
            .transpose()
            .map_err(|e| io::Error::new(e.kind(), format!("joining the close groups: {e}")))?;
        Ok((dumps, close))
    };
    let Some(path) = path else {
        return open_all();
    };
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("entering {}: {e}", path.display())))?;
            open_all()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}
