//! One dump's part of the pipeline (both families, or one family with
//! `--dump-layout per-family`), shared by the poller and the dump's
//! netlinkers: its netlink sockets (one per namespace polled), the epoll
//! set the netlinkers wait on, its receive buffers and its current dumps
//! (one per namespace being dumped).

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    /// When a netlinker last received a datagram or stopped waiting on a
    /// full channel, ns after `started`; and how many wait now.
    started: Instant,
    last_activity_ns: AtomicU64,
    output_waits: AtomicU32,
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
            started: Instant::now(),
            last_activity_ns: AtomicU64::new(0),
            output_waits: AtomicU32::new(0),
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
    /// answering, unless the netlinkers were busy within `within` (a
    /// datagram of any dump received, or a wait on a full channel): then the
    /// other dumps wait their turn (their replies queue in their sockets),
    /// however long that takes.
    pub fn expire(&self, within: Duration, mut expired: impl FnMut(&Dump) -> bool) {
        let idle = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_nanos(self.last_activity_ns.load(Relaxed)));
        if self.output_waits.load(Relaxed) > 0 || idle <= within {
            return;
        }
        self.dumps().retain(|_, d| !expired(d));
    }

    /// A netlinker received a datagram of a dump of this family.
    pub fn active(&self) {
        let now = self.started.elapsed().as_nanos() as u64;
        self.last_activity_ns.store(now, Relaxed);
    }

    /// Counts a netlinker waiting on a full channel until the guard drops
    /// (which counts as activity).
    pub fn waiting_on_output(&self) -> OutputWait<'_> {
        self.output_waits.fetch_add(1, Relaxed);
        OutputWait(self)
    }
}

/// A netlinker of the family waiting on a full channel.
pub struct OutputWait<'a>(&'a FamilyState);

impl Drop for OutputWait<'_> {
    fn drop(&mut self) {
        self.0.active();
        self.0.output_waits.fetch_sub(1, Relaxed);
    }
}
