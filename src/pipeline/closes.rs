//! Close records (`--close-records`): the last state of every TCP socket,
//! sent by the kernel as the socket is destroyed.
//!
//! A polling exporter misses every connection that opens and closes
//! between two polls, and the final counters of every other. The kernel
//! multicasts a `SOCK_DIAG_BY_FAMILY` message (`inet_diag_msg`, the final
//! `tcp_info`, `INET_DIAG_PROTOCOL`; no congestion control or memory
//! attributes) to the members of `SKNLGRP_INET_TCP_DESTROY` and
//! `SKNLGRP_INET6_TCP_DESTROY` of the socket's namespace, and only while
//! someone listens. Each polled namespace gets one [`CloseSocket`] that
//! joins the groups of the polled families; the closer thread waits on all
//! of them (one epoll set, like the netlinkers') and turns each message into
//! a record through the same [`RecordWriter`] as a poll: same sampling,
//! numbering, encoding and destination, `record_kind` closed.
//!
//! The messages wait in the socket's receive buffer. When it is full the
//! kernel drops them, counts them (`SK_MEMINFO_DROPS`) and fails our next
//! read with `ENOBUFS`: the closer counts the overrun and the messages
//! lost, doubles the buffer (up to [`MAX_CLOSE_BUFFER`]) and warns.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

use crate::config::{Family, MAX_CLOSE_BUFFER};
use crate::counting::{CloseTotals, DumpTotals, TcpInfoLengths};
use crate::export::record::PollStamp;
use crate::metrics::Metrics;
use crate::pipeline::family::RELEASE_TOKEN;
use crate::pipeline::report::FirstOfEach;
use crate::pipeline::writer::RecordWriter;
use crate::shutdown::Shutdown;
use crate::wire::request::{AF_INET, AF_INET6};
use xtcp_feed::proto::RecordKind;
use xtcp_feed::receiver::socket_drops;

/// `enum sknetlink_groups` of `include/uapi/linux/sock_diag.h`.
const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SKNLGRP_INET6_TCP_DESTROY: u32 = 3;

/// The largest close message: headers, `inet_diag_msg`, a `tcp_info` of a
/// future kernel and the protocol; one is read at a time.
const MESSAGE_MAX: usize = 8192;

/// A `NETLINK_SOCK_DIAG` socket in the TCP destroy groups of some families,
/// of the namespace it was opened in. Non-blocking.
pub struct CloseSocket {
    fd: OwnedFd,
}

impl CloseSocket {
    /// Opens a socket in the current namespace, joined to the destroy group
    /// of each of `families`, with a receive buffer of `buffer` bytes
    /// (`SO_RCVBUFFORCE` where allowed, else capped by
    /// `net.core.rmem_max`). No privilege is needed to join.
    pub fn open(families: &[Family], buffer: usize) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkSockDiag,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        for family in families {
            let group = match family.af {
                AF_INET => SKNLGRP_INET_TCP_DESTROY,
                AF_INET6 => SKNLGRP_INET6_TCP_DESTROY,
                _ => continue,
            };
            join(&fd, group)?;
        }
        let socket = CloseSocket { fd };
        socket.set_buffer(buffer)?;
        Ok(socket)
    }

    fn set_buffer(&self, bytes: usize) -> io::Result<()> {
        if setsockopt(&self.fd, sockopt::RcvBufForce, &bytes).is_err() {
            setsockopt(&self.fd, sockopt::RcvBuf, &bytes)?;
        }
        Ok(())
    }

    /// The receive buffer the kernel granted, in the bytes asked for.
    pub fn buffer(&self) -> usize {
        nix::sys::socket::getsockopt(&self.fd, sockopt::RcvBuf).map_or(0, |b| b / 2)
    }

    /// Messages the kernel dropped on this socket so far.
    fn drops(&self) -> u32 {
        socket_drops(self.fd.as_fd()).ok().flatten().unwrap_or(0)
    }
}

/// `NETLINK_ADD_MEMBERSHIP` of `group`.
fn join(fd: &OwnedFd, group: u32) -> io::Result<()> {
    // SAFETY: `group` outlives the call, which reads 4 bytes of it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            (&group as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A namespace's close socket and the name its records carry.
struct Watched {
    socket: Arc<CloseSocket>,
    name: Arc<str>,
    /// The socket's drop counter when last read.
    drops_seen: u32,
}

/// The close sockets of every polled namespace, shared by the poller's
/// namespace refresh (which adds and removes them) and the closer thread.
pub struct CloseState {
    pub families: Vec<Family>,
    /// `--close-buffer`: what each new socket asks for.
    pub buffer: usize,
    epoll: Epoll,
    sockets: Mutex<HashMap<u64, Watched>>,
    /// The id of the last poll started, for the records' `poll_id`.
    pub last_poll: AtomicU64,
}

impl CloseState {
    /// No namespace yet; `release` ends the closer (`Shutdown::release_fd`).
    pub fn new(families: Vec<Family>, buffer: usize, release: BorrowedFd<'_>) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(release, EpollEvent::new(EpollFlags::EPOLLIN, RELEASE_TOKEN))?;
        Ok(CloseState {
            families,
            buffer,
            epoll,
            sockets: Mutex::default(),
            last_poll: AtomicU64::new(0),
        })
    }

    fn sockets(&self) -> MutexGuard<'_, HashMap<u64, Watched>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches the close socket of the namespace with this inode.
    pub fn add(&self, inode: u64, name: Arc<str>, socket: Arc<CloseSocket>) -> io::Result<()> {
        self.epoll.add(
            socket.fd.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, inode),
        )?;
        self.sockets().insert(
            inode,
            Watched {
                socket,
                name,
                drops_seen: 0,
            },
        );
        Ok(())
    }

    /// The namespace is now selected under `name`.
    pub fn rename(&self, inode: u64, name: Arc<str>) {
        if let Some(w) = self.sockets().get_mut(&inode) {
            w.name = name;
        }
    }

    /// Stops watching (and closes) the namespace's socket.
    pub fn remove(&self, inode: u64) {
        if let Some(w) = self.sockets().remove(&inode) {
            let _ = self.epoll.delete(w.socket.fd.as_fd());
        }
    }
}

/// The closer thread: reads close messages until the pipeline stops.
pub struct Closer {
    pub state: Arc<CloseState>,
    pub writer: RecordWriter,
    pub metrics: Arc<Metrics>,
    /// The first error of each kind is said on stderr.
    pub said: FirstOfEach,
}

impl Closer {
    pub fn run(mut self, shutdown: &Shutdown) -> CloseTotals {
        if let Some(w) = self.state.sockets().values().next() {
            self.metrics
                .table
                .close_buffer
                .set(w.socket.buffer() as i64);
        }
        let mut buf = vec![0u8; MESSAGE_MAX];
        let mut events = [EpollEvent::empty(); 16];
        let mut output_closed = false;
        loop {
            let n = match self.state.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    shutdown.abort(format!("waiting for close messages: {e}"));
                    return self.metrics.closes.totals();
                }
            };
            let mut released = false;
            for event in &events[..n] {
                match event.data() {
                    RELEASE_TOKEN => released = true,
                    inode => {
                        if !self.drain(inode, &mut buf, &mut output_closed, shutdown) {
                            return self.metrics.closes.totals();
                        }
                    }
                }
            }
            if released || shutdown.is_aborted() {
                // Closes already queued are read before the exit.
                let inodes: Vec<u64> = self.state.sockets().keys().copied().collect();
                for inode in inodes {
                    self.drain(inode, &mut buf, &mut output_closed, shutdown);
                }
                return self.metrics.closes.totals();
            }
        }
    }

    /// Reads every message queued on the namespace's socket and sends their
    /// records. `false` when the pipeline must stop (an output error).
    fn drain(
        &mut self,
        inode: u64,
        buf: &mut [u8],
        output_closed: &mut bool,
        shutdown: &Shutdown,
    ) -> bool {
        // A namespace removed since the event is skipped.
        let Some((socket, name)) = self
            .state
            .sockets()
            .get(&inode)
            .map(|w| (Arc::clone(&w.socket), Arc::clone(&w.name)))
        else {
            return true;
        };
        let mut tally = DumpTotals::default();
        let mut lengths = TcpInfoLengths::default();
        let mut written = Ok(());
        loop {
            let len = match recv(socket.fd.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(len) => len,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(Errno::ENOBUFS) => {
                    self.overrun(inode, &socket);
                    continue;
                }
                Err(e) => {
                    shutdown.abort(format!("reading close messages: {e}"));
                    return false;
                }
            };
            let datagram = &buf[..len];
            if *output_closed || written.is_err() {
                self.writer.skip_datagram(datagram, 0, &mut tally);
                continue;
            }
            let stamp = PollStamp {
                netns_inode: inode,
                netns_name: Arc::clone(&name),
                kind: RecordKind::Closed,
                ..PollStamp::now(self.state.last_poll.load(Relaxed))
            };
            // Multicast messages carry sequence number 0.
            written =
                self.writer
                    .write_datagram(datagram, 0, &stamp, &mut tally, &mut lengths, |e| {
                        self.said.say("decode", &e)
                    });
        }
        // Drops while the queue stayed full raise no new ENOBUFS: the
        // counter is read after every batch too.
        self.note_drops(inode, &socket);
        let (flushed, send_error) = self.writer.flush(written, &mut tally);
        if let Some(e) = send_error {
            self.said.say("send", &e);
        }
        self.count(&CloseTotals::of_written(&tally));
        match flushed {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                *output_closed = true;
                shutdown.stop();
                true
            }
            Err(e) => {
                shutdown.abort(format!("writing records: {e}"));
                false
            }
        }
    }

    /// `ENOBUFS`: the kernel dropped messages. Counts them, doubles the
    /// buffer up to [`MAX_CLOSE_BUFFER`], and says so.
    fn overrun(&mut self, inode: u64, socket: &CloseSocket) {
        self.note_drops(inode, socket);
        let was = socket.buffer();
        let grown = (was * 2).min(MAX_CLOSE_BUFFER);
        if grown > was {
            let _ = socket.set_buffer(grown);
        }
        let now = socket.buffer();
        self.count(&CloseTotals {
            overruns: 1,
            ..CloseTotals::default()
        });
        self.metrics.table.close_buffer.set(now as i64);
        xtcp_service::say!(
            "xtcp: warning: close messages lost ({} so far), the kernel's queue for them full \
             ({was} bytes); receive buffer now {now} bytes",
            self.metrics.closes.totals().lost
        );
    }

    /// Counts the messages the kernel dropped on the namespace's socket
    /// since the last look.
    fn note_drops(&self, inode: u64, socket: &CloseSocket) {
        let drops = socket.drops();
        let lost = self.state.sockets().get_mut(&inode).map_or(0, |w| {
            let lost = drops.wrapping_sub(w.drops_seen);
            w.drops_seen = drops;
            u64::from(lost)
        });
        self.count(&CloseTotals {
            lost,
            ..CloseTotals::default()
        });
    }

    /// Counts into the metrics, whose totals are the run's.
    fn count(&self, counted: &CloseTotals) {
        self.metrics.closes.add(&[], counted);
    }
}
