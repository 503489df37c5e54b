//! One dump's part of the pipeline (both families, or one family with
//! `--dump-layout per-family`), shared by the poller and the dump's
//! netlinkers: its netlink sockets (one per namespace polled), the epoll
//! set the netlinkers wait on, its receive buffers and its current dumps
//! (one per namespace being dumped).

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::config::Family;
use crate::pipeline::dump::Dump;
use crate::pipeline::pool::BufferPool;
use crate::pipeline::sock_diag::SockDiagSocket;

/// One dump's sockets (one per namespace), buffers and current dumps, shared
/// by the poller and the dump's netlinkers; `family.af` is `AF_UNSPEC` for
/// the one dump of both families.
pub struct FamilyState {
    pub family: Family,
    /// Every socket of the family, and the release fd: what the netlinkers
    /// wait on. Socket events carry the namespace's inode,
    /// [`RELEASE_TOKEN`] is the release fd.
    pub epoll: Epoll,
    sockets: Mutex<HashMap<u64, Arc<SockDiagSocket>>>,
    pub pool: Arc<BufferPool>,
    /// The dumps replies are currently expected for, by namespace inode
    /// (the epoll token of the namespace's socket).
    current: Mutex<HashMap<u64, Arc<Dump>>>,
    /// Datagrams of no current dump (the tail of an abandoned one).
    pub stale_datagrams: AtomicU64,
}

/// The epoll token of the shutdown release fd (no inode is `u64::MAX`).
pub const RELEASE_TOKEN: u64 = u64::MAX;

impl FamilyState {
    /// A family with no namespace yet; `release` wakes its netlinkers for
    /// good (`Shutdown::release_fd`).
    pub fn new(family: Family, pool: Arc<BufferPool>, release: BorrowedFd<'_>) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(release, EpollEvent::new(EpollFlags::EPOLLIN, RELEASE_TOKEN))?;
        Ok(FamilyState {
            family,
            epoll,
            sockets: Mutex::default(),
            pool,
            current: Mutex::default(),
            stale_datagrams: AtomicU64::new(0),
        })
    }

    fn sockets(&self) -> MutexGuard<'_, HashMap<u64, Arc<SockDiagSocket>>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching the socket of the namespace with this inode.
    pub fn add_socket(&self, inode: u64, socket: Arc<SockDiagSocket>) -> io::Result<()> {
        self.epoll
            .add(&*socket, EpollEvent::new(EpollFlags::EPOLLIN, inode))?;
        self.sockets().insert(inode, socket);
        Ok(())
    }

    /// Stops watching a namespace's socket; it closes when the last dump
    /// holding it ends.
    pub fn remove_socket(&self, inode: u64) {
        if let Some(socket) = self.sockets().remove(&inode) {
            // Fails only if it was never added, which the map rules out.
            let _ = self.epoll.delete(&*socket);
        }
    }

    /// The socket an epoll event names; `None` once removed.
    pub fn socket(&self, token: u64) -> Option<Arc<SockDiagSocket>> {
        self.sockets().get(&token).cloned()
    }

    fn dumps(&self) -> MutexGuard<'_, HashMap<u64, Arc<Dump>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dump replies on the socket with this epoll token are expected
    /// for, if any.
    pub fn current(&self, token: u64) -> Option<Arc<Dump>> {
        self.dumps().get(&token).cloned()
    }

    /// Makes `dump` the current one of its namespace, before its request
    /// goes out (a netlinker that sees the first reply must find it).
    pub fn publish(&self, dump: Arc<Dump>) {
        self.dumps().insert(dump.stamp.netns_inode, dump);
    }

    /// Ends `dump` as its namespace's current one (if it still is): no more
    /// replies are expected for it.
    pub fn retire(&self, dump: &Arc<Dump>) {
        let mut dumps = self.dumps();
        let inode = dump.stamp.netns_inode;
        if dumps.get(&inode).is_some_and(|c| Arc::ptr_eq(c, dump)) {
            dumps.remove(&inode);
        }
    }

    /// Retires every current dump `expired` says the kernel stopped
    /// answering, unless one is still `progressing`: then the netlinkers are
    /// busy with it, and the others wait their turn (their replies queue in
    /// their sockets), however long that takes.
    pub fn expire(
        &self,
        progressing: impl Fn(&Dump) -> bool,
        mut expired: impl FnMut(&Dump) -> bool,
    ) {
        let mut dumps = self.dumps();
        if !dumps.values().any(|d| progressing(d)) {
            dumps.retain(|_, d| !expired(d));
        }
    }
}
