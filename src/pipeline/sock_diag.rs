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
pub fn scan_datagram<'a>(
    datagram: &'a [u8],
    seq: u32,
    mut on_socket: impl FnMut(&'a [u8]),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::message::{
        put_header, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_DUMP_INTR, NLM_F_MULTI,
        SOCK_DIAG_BY_FAMILY,
    };

    /// One message: header and `payload`, padded to 4 bytes.
    fn msg(msg_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut hdr = [0u8; NLMSG_HDRLEN];
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        put_header(&mut hdr, len, msg_type, flags, seq);
        let mut out = hdr.to_vec();
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn socket(seq: u32, tag: u8) -> Vec<u8> {
        msg(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, seq, &[tag; 72])
    }

    fn done(seq: u32, errno: i32) -> Vec<u8> {
        msg(NLMSG_DONE, NLM_F_MULTI, seq, &errno.to_ne_bytes())
    }

    /// `NLMSG_ERROR`: the errno, then the request's header.
    fn error(seq: u32, errno: i32) -> Vec<u8> {
        let mut payload = errno.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; NLMSG_HDRLEN]);
        msg(NLMSG_ERROR, 0, seq, &payload)
    }

    fn scan(datagram: &[u8], seq: u32) -> (Result<Option<DatagramScan>, WireError>, Vec<u8>) {
        let mut tags = Vec::new();
        let result = scan_datagram(datagram, seq, |p| tags.push(p[0]));
        (result, tags)
    }

    #[test]
    fn sockets_then_done_end_the_dump() {
        let datagram = [socket(7, 1), socket(7, 2), done(7, 0)].concat();
        let (result, tags) = scan(&datagram, 7);
        let scan = result.unwrap().unwrap();
        assert_eq!((scan.messages, scan.sockets), (3, 2));
        assert!(scan.done && !scan.interrupted);
        assert_eq!(scan.kernel_errno, None);
        assert_eq!(tags, [1, 2], "every socket payload, in order");
    }

    #[test]
    fn an_errno_in_done_or_error_ends_the_dump_as_a_kernel_error() {
        for datagram in [done(3, -libc::ENOBUFS), error(3, -libc::EBUSY)] {
            let scan = scan(&datagram, 3).0.unwrap().unwrap();
            assert!(scan.done, "{datagram:?}");
            assert!(scan.kernel_errno.unwrap() < 0);
        }
    }

    #[test]
    fn an_ack_is_neither_an_error_nor_the_end() {
        let scan = scan(&error(5, 0), 5).0.unwrap().unwrap();
        assert_eq!(
            (scan.messages, scan.done, scan.kernel_errno),
            (1, false, None)
        );
    }

    #[test]
    fn another_dumps_datagram_is_none_and_not_walked() {
        let datagram = [socket(8, 1), done(8, 0)].concat();
        let (result, tags) = scan(&datagram, 9);
        assert_eq!(result.unwrap(), None);
        assert!(tags.is_empty());
    }

    #[test]
    fn dump_intr_is_noted() {
        let datagram = msg(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_MULTI | NLM_F_DUMP_INTR,
            4,
            &[0; 72],
        );
        assert!(scan(&datagram, 4).0.unwrap().unwrap().interrupted);
    }

    #[test]
    fn a_truncated_datagram_is_an_error_after_the_whole_messages() {
        let mut datagram = [socket(6, 1), socket(6, 2)].concat();
        datagram.truncate(datagram.len() - 10);
        let (result, tags) = scan(&datagram, 6);
        assert!(
            matches!(result, Err(WireError::MessageOverrun { .. })),
            "{result:?}"
        );
        assert_eq!(tags, [1], "the whole message before the cut was walked");
        // A DONE without its errno is malformed too.
        let short_done = msg(NLMSG_DONE, 0, 6, &[]);
        assert!(scan(&short_done, 6).0.is_err());
    }
}
