//! The `NETLINK_SOCK_DIAG` socket (sock_diag(7)) and the reading of dumps.
//!
//! A dump is one request datagram followed by reply datagrams until
//! `NLMSG_DONE`. [`scan_datagram`] classifies one reply datagram; the
//! pipeline's netlinkers call it from several threads, and [`DumpReader`]
//! uses it to read one dump on the calling thread (tools and tests). Replies
//! with another sequence number (the tail of an abandoned dump) are ignored.
//! The socket lives in the network namespace of the thread that opened it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use crate::wire::message::{messages, Body};
use crate::wire::request::dump_request;
use crate::wire::WireError;

/// The largest datagram the kernel sends in a dump (it fills each up to
/// about 32 KiB), so the receive buffer that always suffices; larger ones
/// bring nothing (`docs/kernel.md`, measured).
pub const DUMP_DATAGRAM_MAX: usize = 32 * 1024;

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

/// What the walk over one reply datagram of the expected dump found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DatagramScan {
    /// Netlink messages of every type.
    pub messages: u32,
    /// Socket messages (`SOCK_DIAG_BY_FAMILY`).
    pub sockets: u32,
    /// `NLMSG_DONE` (the dump is complete) or an error ended the dump.
    pub done: bool,
    /// `NLMSG_ERROR`/`NLMSG_DONE` with a negative errno: the kernel ended
    /// the dump early.
    pub kernel_errno: Option<i32>,
    /// `NLM_F_DUMP_INTR`: the table changed mid-dump and the kernel may have
    /// skipped or repeated sockets.
    pub interrupted: bool,
}

/// Walks one reply datagram, calling `on_socket` with each socket message
/// payload. Returns `None` when the datagram belongs to another dump than
/// `seq` (every message of a datagram carries the same sequence number).
pub fn scan_datagram(
    datagram: &[u8],
    seq: u32,
    mut on_socket: impl FnMut(&[u8]),
) -> Result<Option<DatagramScan>, WireError> {
    let mut scan = DatagramScan::default();
    for msg in messages(datagram) {
        let msg = msg?;
        if msg.seq != seq {
            return Ok(None);
        }
        scan.messages += 1;
        scan.interrupted |= msg.dump_interrupted();
        match msg.body()? {
            Body::Socket(payload) => {
                scan.sockets += 1;
                on_socket(payload);
            }
            Body::Done { error } | Body::Error { error } if error != 0 => {
                scan.done = true;
                scan.kernel_errno = Some(error);
            }
            Body::Done { .. } => scan.done = true,
            Body::Error { .. } | Body::Other(_) => {}
        }
    }
    Ok(Some(scan))
}

pub struct SockDiagSocket {
    fd: OwnedFd,
    seq: AtomicU32,
}

impl SockDiagSocket {
    /// Opens a socket; a blocking `recv` fails with `WouldBlock` after `timeout`.
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
        Ok(SockDiagSocket {
            fd,
            seq: AtomicU32::new(0),
        })
    }

    /// A sequence number for the next request: whoever reads the replies
    /// must know it before the request goes out.
    pub fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }

    /// Sends a request datagram built elsewhere (`wire::request`); its
    /// sequence number must come from [`Self::next_seq`].
    pub fn send(&self, request: &[u8]) -> io::Result<()> {
        sendto(
            self.fd.as_raw_fd(),
            request,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(())
    }

    /// Receives one datagram into `buf` and returns its length. With
    /// `wait == false` an empty queue is `WouldBlock`. The kernel builds the
    /// next datagram of a running dump inside this call.
    pub fn recv(&self, buf: &mut [u8], wait: bool) -> Result<usize, DumpError> {
        // MSG_TRUNC makes recv return the datagram's real length, so a buffer
        // too small is an error instead of silently cut sockets.
        let mut flags = MsgFlags::MSG_TRUNC;
        if !wait {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        let len = recv(self.fd.as_raw_fd(), buf, flags).map_err(io::Error::from)?;
        if len > buf.len() {
            return Err(DumpError::Truncated {
                len,
                buffer: buf.len(),
            });
        }
        Ok(len)
    }

    /// Sends the dump request for `family` and returns a reader for its reply.
    pub fn dump(&self, family: u8, states: u32, extensions: u8) -> io::Result<DumpReader<'_>> {
        self.dump_with(|seq| dump_request(family, states, extensions, seq))
    }

    /// Sends the request `build` makes for a new sequence number and
    /// returns a reader for its reply.
    pub fn dump_with<R: AsRef<[u8]>>(
        &self,
        build: impl FnOnce(u32) -> R,
    ) -> io::Result<DumpReader<'_>> {
        let seq = self.next_seq();
        self.send(build(seq).as_ref())?;
        Ok(DumpReader {
            socket: self,
            seq,
            done: false,
        })
    }
}

impl AsFd for SockDiagSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Reads the reply datagrams of one dump request on the calling thread.
pub struct DumpReader<'s> {
    socket: &'s SockDiagSocket,
    seq: u32,
    done: bool,
}

impl DumpReader<'_> {
    /// Receives the next datagram into `buf` and returns its length, or `None`
    /// once the dump is complete. Pass the bytes to [`Self::scan`].
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, DumpError> {
        if self.done {
            return Ok(None);
        }
        self.socket.recv(buf, true).map(Some)
    }

    /// Walks one received datagram, calling `on_socket` with each socket
    /// message payload of this dump, and notes the end of the dump.
    pub fn scan(&mut self, datagram: &[u8], on_socket: impl FnMut(&[u8])) -> Result<(), DumpError> {
        let Some(scan) = scan_datagram(datagram, self.seq, on_socket)? else {
            return Ok(());
        };
        self.done |= scan.done;
        match scan.kernel_errno {
            Some(errno) => Err(DumpError::Kernel { errno }),
            None => Ok(()),
        }
    }
}
