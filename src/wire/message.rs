//! Netlink message framing over a `recvfrom` buffer (see netlink(7) and
//! `include/uapi/linux/netlink.h`).
//!
//! A dump reply arrives as a series of datagrams, each holding one or more
//! `nlmsghdr`-framed messages padded to 4 bytes, and ends with `NLMSG_DONE`.
//! [`Messages`] walks one buffer; it stops after the first framing error
//! because nothing after a bad length can be trusted.

use super::bytes::{align4, u16_ne_at, u32_ne_at, NeInt};
use super::error::WireError;

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
/// `SOCK_DIAG_BY_FAMILY` from `include/uapi/linux/sock_diag.h`.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCPDIAG_GETSOCK`, the pre-`sock_diag` request type the kernel still
/// serves (`inet_diag_rcv_msg_compat`); its replies carry this type and the
/// same `inet_diag_msg` payload.
pub const TCPDIAG_GETSOCK: u16 = 18;

pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
/// The dump was interrupted by a table change and may be inconsistent.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;

/// One netlink message borrowed from a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlMsg<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    /// The bytes after the header, up to `nlmsg_len` (padding excluded).
    pub payload: &'a [u8],
}

/// What a message means to a dump reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// A `SOCK_DIAG_BY_FAMILY` (or `TCPDIAG_GETSOCK`) reply: an
    /// `inet_diag_msg` and its attributes.
    Socket(&'a [u8]),
    /// `NLMSG_DONE`; `error` is the kernel's int payload (0, or a negative errno).
    Done { error: i32 },
    /// `NLMSG_ERROR` with `error` = 0 (an ack) or a negative errno.
    Error { error: i32 },
    /// `NLMSG_NOOP` or a type a sock_diag dump does not use.
    Other(u16),
}

impl<'a> NlMsg<'a> {
    /// `NLM_F_DUMP_INTR`: the kernel saw the table change during the dump.
    pub fn dump_interrupted(&self) -> bool {
        self.flags & NLM_F_DUMP_INTR != 0
    }

    /// Classifies the message; `NLMSG_ERROR` and `NLMSG_DONE` must carry their int.
    pub fn body(&self) -> Result<Body<'a>, WireError> {
        let errno = |kind| {
            i32::read(self.payload, 0).ok_or(WireError::ShortControlMessage {
                kind,
                len: self.payload.len(),
                need: 4,
            })
        };
        Ok(match self.msg_type {
            SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => Body::Socket(self.payload),
            NLMSG_DONE => Body::Done {
                error: errno("NLMSG_DONE")?,
            },
            NLMSG_ERROR => Body::Error {
                error: errno("NLMSG_ERROR")?,
            },
            other => Body::Other(other),
        })
    }
}

/// Iterator over the netlink messages of one receive buffer.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

/// Walks the messages in `buf` (the bytes one `recvfrom` returned).
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<NlMsg<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let item = next_message(self.rest);
        self.rest = match item {
            Ok((_, rest)) => rest,
            Err(_) => &[],
        };
        Some(item.map(|(msg, _)| msg))
    }
}

fn next_message(buf: &[u8]) -> Result<(NlMsg<'_>, &[u8]), WireError> {
    let Some(hdr) = buf.first_chunk::<NLMSG_HDRLEN>() else {
        return Err(WireError::TruncatedHeader {
            remaining: buf.len(),
        });
    };
    let len = u32_ne_at::<0, NLMSG_HDRLEN>(hdr);
    let len_usize = len as usize;
    if len_usize < NLMSG_HDRLEN {
        return Err(WireError::MessageTooShort { len });
    }
    if len_usize > buf.len() {
        return Err(WireError::MessageOverrun {
            len,
            remaining: buf.len(),
        });
    }
    let msg = NlMsg {
        msg_type: u16_ne_at::<4, NLMSG_HDRLEN>(hdr),
        flags: u16_ne_at::<6, NLMSG_HDRLEN>(hdr),
        seq: u32_ne_at::<8, NLMSG_HDRLEN>(hdr),
        pid: u32_ne_at::<12, NLMSG_HDRLEN>(hdr),
        payload: &buf[NLMSG_HDRLEN..len_usize],
    };
    // The last message of a datagram may omit its padding.
    let next = align4(len_usize).min(buf.len());
    Ok((msg, &buf[next..]))
}

/// The sequence number of a reply datagram (that of its first message; a
/// datagram answers one request), `None` if it has no whole header.
pub fn datagram_seq(buf: &[u8]) -> Option<u32> {
    buf.first_chunk::<NLMSG_HDRLEN>()
        .map(u32_ne_at::<8, NLMSG_HDRLEN>)
}

/// Writes a `struct nlmsghdr` into `out[..16]` (helper for request builders and tests).
pub fn put_header(out: &mut [u8; NLMSG_HDRLEN], len: u32, msg_type: u16, flags: u16, seq: u32) {
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&msg_type.to_ne_bytes());
    out[6..8].copy_from_slice(&flags.to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out[12..16].copy_from_slice(&0u32.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(msg_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut hdr = [0u8; NLMSG_HDRLEN];
        put_header(
            &mut hdr,
            (NLMSG_HDRLEN + payload.len()) as u32,
            msg_type,
            flags,
            seq,
        );
        let mut v = hdr.to_vec();
        v.extend_from_slice(payload);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn walks_multipart_buffer_to_done() {
        let mut buf = msg(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, 7, &[1, 2, 3, 4, 5]);
        buf.extend(msg(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_MULTI | NLM_F_DUMP_INTR,
            7,
            &[9; 8],
        ));
        buf.extend(msg(NLMSG_DONE, NLM_F_MULTI, 7, &0i32.to_ne_bytes()));
        let msgs: Vec<_> = messages(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].body().unwrap(), Body::Socket(&[1, 2, 3, 4, 5]));
        assert!(!msgs[0].dump_interrupted());
        assert!(msgs[1].dump_interrupted());
        assert_eq!(msgs[1].seq, 7);
        assert_eq!(msgs[2].body().unwrap(), Body::Done { error: 0 });
    }

    #[test]
    fn error_message_carries_errno() {
        let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
        payload.extend([0u8; 16]); // the echoed request header
        let buf = msg(NLMSG_ERROR, 0, 1, &payload);
        let m = messages(&buf).next().unwrap().unwrap();
        assert_eq!(
            m.body().unwrap(),
            Body::Error {
                error: -libc::EPERM
            }
        );
    }

    #[test]
    fn datagram_seq_is_the_first_header_s() {
        let mut buf = msg(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, 42, &[1, 2, 3, 4]);
        buf.extend(msg(NLMSG_DONE, NLM_F_MULTI, 42, &[0; 4]));
        assert_eq!(datagram_seq(&buf), Some(42));
        assert_eq!(datagram_seq(&buf[..NLMSG_HDRLEN - 1]), None);
    }

    #[test]
    fn unpadded_last_message_is_accepted() {
        let mut buf = msg(SOCK_DIAG_BY_FAMILY, 0, 1, &[1, 2, 3]);
        buf.truncate(NLMSG_HDRLEN + 3);
        assert_eq!(messages(&buf).count(), 1);
    }

    #[test]
    fn framing_errors_stop_the_walk() {
        let good = msg(NLMSG_NOOP, 0, 1, &[]);
        let cases: [(Vec<u8>, WireError); 4] = [
            (vec![0; 10], WireError::TruncatedHeader { remaining: 10 }),
            (
                {
                    let mut b = good.clone();
                    b[0..4].copy_from_slice(&8u32.to_ne_bytes());
                    b
                },
                WireError::MessageTooShort { len: 8 },
            ),
            (
                {
                    let mut b = good.clone();
                    b[0..4].copy_from_slice(&64u32.to_ne_bytes());
                    b
                },
                WireError::MessageOverrun {
                    len: 64,
                    remaining: 16,
                },
            ),
            (
                msg(NLMSG_DONE, 0, 1, &[0, 0]),
                WireError::ShortControlMessage {
                    kind: "NLMSG_DONE",
                    len: 2,
                    need: 4,
                },
            ),
        ];
        for (buf, want) in cases {
            let mut it = messages(&buf);
            let got = it.next().unwrap().and_then(|m| m.body().map(|_| ()));
            assert_eq!(got, Err(want));
        }
        let mut it = messages(&[0u8; 3]);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none(), "iteration stops after a framing error");
    }
}
