//! The dump requests (`include/uapi/linux/inet_diag.h`): for one family,
//! `SOCK_DIAG_BY_FAMILY` with `struct inet_diag_req_v2`; for both at once,
//! the older `TCPDIAG_GETSOCK` with `struct inet_diag_req`.

use super::message::{
    put_header, NLMSG_HDRLEN, NLM_F_DUMP, NLM_F_REQUEST, SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK,
};

/// Size of `struct inet_diag_req_v2`.
pub const INET_DIAG_REQ_V2_LEN: usize = 56;
/// Size of the whole request datagram.
pub const DUMP_REQUEST_LEN: usize = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;

pub const AF_INET: u8 = libc::AF_INET as u8;
pub const AF_INET6: u8 = libc::AF_INET6 as u8;
/// Both families: a request for it is a [`both_families_request`].
pub const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;

/// Size of the old `struct inet_diag_req`.
pub const INET_DIAG_REQ_LEN: usize = 60;
/// Size of the whole old-style request datagram.
pub const BOTH_FAMILIES_REQUEST_LEN: usize = NLMSG_HDRLEN + INET_DIAG_REQ_LEN;

/// Every TCP state, ESTABLISHED (1) to BOUND_INACTIVE (13), as `1 << state` bits.
pub const ALL_STATES: u32 = ((1 << 14) - 1) & !1;

/// BOUND_INACTIVE (13): sockets bound to a port but neither listening nor
/// connecting, which the kernel reports as CLOSE. Not a state of the
/// connection tables: asking for it makes every dump walk the whole bind
/// table too (`inet_diag_dump_icsk`), one bucket lock at a time, which costs
/// as much as a sixth of a poll however few such sockets there are.
pub const BOUND_INACTIVE: u32 = 1 << 13;

/// What `--states all` asks for: every state of the connection tables.
pub const DEFAULT_STATES: u32 = ALL_STATES & !BOUND_INACTIVE;

/// Extension bits (`1 << (INET_DIAG_X - 1)`) asking for every attribute a TCP
/// socket can carry: MEMINFO, INFO, VEGASINFO, CONG, TOS, TCLASS, SKMEMINFO.
/// VEGASINFO must be set or the kernel sends neither BBRINFO nor DCTCPINFO
/// (`tcp_diag_get_aux_size` / `tcp_diag_get_info` gate both on it); TCLASS
/// also brings CLASS_ID.
pub const ALL_EXTENSIONS: u8 = 0x7f;
const _: () = assert!(
    ALL_EXTENSIONS & (1 << 2) != 0,
    "VEGASINFO bit gates BBR/DCTCP info"
);

/// Writes the `nlmsghdr` of a dump request of type `msg_type` filling all of
/// `out`; returns the bytes after it.
pub fn dump_header<const N: usize>(out: &mut [u8; N], msg_type: u16, seq: u32) -> &mut [u8] {
    const { assert!(N > NLMSG_HDRLEN) };
    let (hdr, req) = out.split_at_mut(NLMSG_HDRLEN);
    if let Ok(hdr) = <&mut [u8; NLMSG_HDRLEN]>::try_from(hdr) {
        put_header(hdr, N as u32, msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq);
    }
    req
}

/// Builds the dump request for one address family.
pub fn dump_request(family: u8, states: u32, extensions: u8, seq: u32) -> [u8; DUMP_REQUEST_LEN] {
    let mut out = [0u8; DUMP_REQUEST_LEN];
    let req = dump_header(&mut out, SOCK_DIAG_BY_FAMILY, seq);
    req[0] = family; // sdiag_family
    req[1] = libc::IPPROTO_TCP as u8; // sdiag_protocol
    req[2] = extensions; // idiag_ext
    req[4..8].copy_from_slice(&states.to_ne_bytes()); // idiag_states
                                                      // req[8..56]: inet_diag_sockid left zero = match every socket.
    out
}

/// Builds a dump request for IPv4 and IPv6 sockets at once. The old
/// `inet_diag_req` has no family field the kernel honours: its dump runs
/// with `AF_UNSPEC` (`inet_diag_dump_compat`), so one walk of the socket
/// tables returns both families, where two `SOCK_DIAG_BY_FAMILY` dumps walk
/// them twice. Replies carry the request's type, `TCPDIAG_GETSOCK`, and the
/// same messages. Same states and extension bits as [`dump_request`].
pub fn both_families_request(
    states: u32,
    extensions: u8,
    seq: u32,
) -> [u8; BOTH_FAMILIES_REQUEST_LEN] {
    let mut out = [0u8; BOTH_FAMILIES_REQUEST_LEN];
    let req = dump_header(&mut out, TCPDIAG_GETSOCK, seq);
    req[3] = extensions; // idiag_ext, after family and the two address lengths
                         // req[4..52]: inet_diag_sockid left zero = match every socket.
    req[52..56].copy_from_slice(&states.to_ne_bytes()); // idiag_states
    out
}

/// `INET_DIAG_REQ_BYTECODE`: the attribute carrying a filter program.
pub const INET_DIAG_REQ_BYTECODE: u16 = 1;

/// The dump request of `family` ([`AF_UNSPEC`]: both, one walk), followed
/// by an `INET_DIAG_REQ_BYTECODE` attribute: the kernel runs `bytecode`
/// (see [`super::bytecode`]) on each socket and builds messages only for
/// those it accepts. An empty program accepts every socket, and is left
/// out: the kernel refuses an empty attribute.
pub fn filtered_dump_request(
    family: u8,
    states: u32,
    extensions: u8,
    bytecode: &[u8],
    seq: u32,
) -> Vec<u8> {
    let mut out = match family {
        AF_UNSPEC => both_families_request(states, extensions, seq).to_vec(),
        _ => dump_request(family, states, extensions, seq).to_vec(),
    };
    if bytecode.is_empty() {
        return out;
    }
    let attr_len = 4 + bytecode.len();
    let total = out.len() + attr_len;
    out.reserve(attr_len);
    out[..4].copy_from_slice(&(total as u32).to_ne_bytes());
    out.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    out.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    out.extend_from_slice(bytecode);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::message::{messages, Body};

    #[test]
    fn request_layout() {
        let r = dump_request(AF_INET6, ALL_STATES, ALL_EXTENSIONS, 42);
        let m = messages(&r).next().unwrap().unwrap();
        assert_eq!(m.msg_type, SOCK_DIAG_BY_FAMILY);
        assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(m.seq, 42);
        let Body::Socket(req) = m.body().unwrap() else {
            panic!("not a sock_diag message")
        };
        assert_eq!(req.len(), INET_DIAG_REQ_V2_LEN);
        assert_eq!(&req[..4], &[10, 6, 0x7f, 0]);
        assert_eq!(u32::from_ne_bytes(req[4..8].try_into().unwrap()), 0x3ffe);
        assert!(req[8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn filtered_request_carries_the_program() {
        let program = [1, 2, 3, 4, 5, 6, 7, 8];
        let r = filtered_dump_request(AF_INET, ALL_STATES, ALL_EXTENSIONS, &program, 9);
        assert_eq!(r.len(), DUMP_REQUEST_LEN + 4 + program.len());
        let m = messages(&r).next().unwrap().unwrap();
        assert_eq!((m.msg_type, m.seq), (SOCK_DIAG_BY_FAMILY, 9));
        assert_eq!(
            &m.payload[..INET_DIAG_REQ_V2_LEN],
            &dump_request(AF_INET, ALL_STATES, ALL_EXTENSIONS, 9)[NLMSG_HDRLEN..]
        );
        let attr = &m.payload[INET_DIAG_REQ_V2_LEN..];
        assert_eq!(u16::from_ne_bytes([attr[0], attr[1]]), 12);
        assert_eq!(
            u16::from_ne_bytes([attr[2], attr[3]]),
            INET_DIAG_REQ_BYTECODE
        );
        assert_eq!(&attr[4..], &program);
        let unfiltered = filtered_dump_request(AF_INET, ALL_STATES, ALL_EXTENSIONS, &[], 9);
        assert_eq!(
            unfiltered,
            dump_request(AF_INET, ALL_STATES, ALL_EXTENSIONS, 9)
        );
    }

    #[test]
    fn both_families_request_layout() {
        let program = [1, 2, 3, 4];
        let r = filtered_dump_request(AF_UNSPEC, ALL_STATES, ALL_EXTENSIONS, &program, 7);
        assert_eq!(r.len(), BOTH_FAMILIES_REQUEST_LEN + 8);
        let m = messages(&r).next().unwrap().unwrap();
        assert_eq!(m.msg_type, TCPDIAG_GETSOCK);
        assert_eq!((m.flags, m.seq), (NLM_F_REQUEST | NLM_F_DUMP, 7));
        let (req, attr) = m.payload.split_at(INET_DIAG_REQ_LEN);
        // Family and address lengths zero, then the extensions.
        assert_eq!(&req[..4], &[0, 0, 0, 0x7f]);
        assert_eq!(u32::from_ne_bytes(req[52..56].try_into().unwrap()), 0x3ffe);
        assert!(req[4..52].iter().chain(&req[56..]).all(|&b| b == 0));
        assert_eq!(attr, &[8, 0, 1, 0, 1, 2, 3, 4]);
        assert_eq!(
            filtered_dump_request(AF_UNSPEC, ALL_STATES, ALL_EXTENSIONS, &[], 7),
            both_families_request(ALL_STATES, ALL_EXTENSIONS, 7)
        );
    }
}
