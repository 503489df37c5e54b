//! The `NETLINK_SOCK_DIAG` socket (sock_diag(7)) and the reading of one dump.
//!
//! A dump is one request datagram followed by reply datagrams until
//! `NLMSG_DONE`. [`DumpReader`] does the `recv` calls and hands each socket
//! message to a callback; anything with another sequence number (the tail of
//! an earlier dump that was abandoned) is ignored. The socket lives in the
//! network namespace of the thread that opened it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use crate::wire::netlink::{messages, Body};
use crate::wire::request::dump_request;
use crate::wire::WireError;

/// Receive buffer size: one dump datagram is at most 32 KiB, and larger
/// buffers bring nothing (`shared/KERNEL.md`, measured).
pub const RECV_BUFFER_LEN: usize = 32 * 1024;

/// Why a dump could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("kernel refused the dump: {}", io::Error::from_raw_os_error(-errno))]
    Kernel { errno: i32 },
    #[error("netlink datagram of {len} bytes did not fit the {buffer}-byte receive buffer")]
    Truncated { len: usize, buffer: usize },
    #[error("malformed netlink reply: {0}")]
    Wire(#[from] WireError),
}

/// What one dump delivered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DumpStats {
    pub datagrams: u64,
    pub bytes: u64,
    /// Socket messages of this dump's sequence number.
    pub sockets: u64,
    /// Some message carried `NLM_F_DUMP_INTR`: the table changed mid-dump and
    /// the kernel may have skipped or repeated sockets.
    pub interrupted: bool,
}

impl DumpStats {
    /// Accumulates another dump's figures (a poll dumps several families).
    pub fn add(&mut self, other: &DumpStats) {
        self.datagrams += other.datagrams;
        self.bytes += other.bytes;
        self.sockets += other.sockets;
        self.interrupted |= other.interrupted;
    }
}

pub struct SockDiagSocket {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiagSocket {
    /// Opens a socket; `recv` fails with `WouldBlock`/`TimedOut` after `timeout`.
    pub fn open(timeout: Duration) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _),
        )?;
        Ok(SockDiagSocket { fd, seq: 0 })
    }

    /// Sends the dump request for `family` and returns a reader for its reply.
    pub fn dump(&mut self, family: u8, states: u32, extensions: u8) -> io::Result<DumpReader<'_>> {
        self.seq = self.seq.wrapping_add(1);
        let req = dump_request(family, states, extensions, self.seq);
        sendto(
            self.fd.as_raw_fd(),
            &req,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(DumpReader {
            socket: self,
            done: false,
            stats: DumpStats::default(),
        })
    }
}

/// Reads the reply datagrams of one dump request.
pub struct DumpReader<'s> {
    socket: &'s SockDiagSocket,
    done: bool,
    stats: DumpStats,
}

impl DumpReader<'_> {
    /// Receives the next datagram into `buf` and returns its length, or `None`
    /// once `NLMSG_DONE` has been seen. Pass the bytes to [`Self::scan`].
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, DumpError> {
        if self.done {
            return Ok(None);
        }
        // MSG_TRUNC makes recv return the datagram's real length, so a buffer
        // too small is an error instead of silently cut sockets.
        let len =
            recv(self.socket.fd.as_raw_fd(), buf, MsgFlags::MSG_TRUNC).map_err(io::Error::from)?;
        if len > buf.len() {
            return Err(DumpError::Truncated {
                len,
                buffer: buf.len(),
            });
        }
        self.stats.datagrams += 1;
        self.stats.bytes += len as u64;
        Ok(Some(len))
    }

    /// Walks one received datagram, calling `on_socket` with each socket
    /// message payload of this dump, and notes `NLMSG_DONE`.
    pub fn scan(
        &mut self,
        datagram: &[u8],
        mut on_socket: impl FnMut(&[u8]),
    ) -> Result<(), DumpError> {
        for msg in messages(datagram) {
            let msg = msg?;
            if msg.seq != self.socket.seq {
                continue;
            }
            self.stats.interrupted |= msg.dump_interrupted();
            match msg.body()? {
                Body::Socket(payload) => {
                    self.stats.sockets += 1;
                    on_socket(payload);
                }
                Body::Done { error: 0 } => self.done = true,
                Body::Done { error } | Body::Error { error } if error != 0 => {
                    self.done = true;
                    return Err(DumpError::Kernel { errno: error });
                }
                Body::Done { .. } | Body::Error { .. } | Body::Other(_) => {}
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> DumpStats {
        self.stats
    }
}
