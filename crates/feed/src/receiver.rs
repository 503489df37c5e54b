//! The receiving end of the feed: a socket with a receive buffer fit for
//! a poll's burst, and the kernel's count of what it dropped.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

/// `SK_MEMINFO_DROPS`: the entry of `SO_MEMINFO`'s `u32` array counting
/// what the socket dropped.
const SK_MEMINFO_DROPS: usize = 8;

/// A UDP socket bound to `listen` for receiving the records of exporters,
/// with `recv_buffer` bytes of receive buffer asked for (see
/// [`adopt_receiver`]). With `reuse_port`, `SO_REUSEPORT` lets a new
/// process of the same user bind beside this one before it stops, so that
/// a restart by hand loses no datagram.
pub fn bind_receiver(
    listen: SocketAddr,
    recv_buffer: usize,
    program: &str,
    reuse_port: bool,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM, // socket2 sets SOCK_CLOEXEC
        Some(Protocol::UDP),
    )?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&listen.into())?;
    adopt_receiver(socket.into(), recv_buffer, program)
}

/// Asks for `recv_buffer` bytes of receive buffer on `socket`: a poll
/// arrives as a burst, and a small buffer drops datagrams. `SO_RCVBUFFORCE`
/// (needs `CAP_NET_ADMIN`) ignores `net.core.rmem_max`; without it
/// `SO_RCVBUF` is capped there, and a warning prefixed with `program` says
/// so.
pub fn adopt_receiver(
    socket: UdpSocket,
    recv_buffer: usize,
    program: &str,
) -> io::Result<UdpSocket> {
    let wanted = recv_buffer.min(i32::MAX as usize / 2);
    if setsockopt(&socket, sockopt::RcvBufForce, &wanted).is_err() {
        socket2::SockRef::from(&socket).set_recv_buffer_size(wanted)?;
    }
    let granted = recv_buffer_len(&socket)?;
    if granted < wanted {
        xtcp_service::say!(
            "{program}: warning: UDP receive buffer is {granted} bytes, not the {wanted} asked \
             for (net.core.rmem_max; CAP_NET_ADMIN lifts it): bursts may be dropped"
        );
    }
    Ok(socket)
}

/// The first socket systemd passed (socket activation: `LISTEN_PID` names
/// this process and `LISTEN_FDS` is at least 1, the sockets from fd 3), if
/// it is a UDP socket. A socket unit keeps it open while the service
/// restarts, so the datagrams of that moment wait in its buffer.
pub fn inherited_socket() -> io::Result<Option<UdpSocket>> {
    const FIRST: std::os::fd::RawFd = 3;
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    if var("LISTEN_PID") != Some(std::process::id()) || var("LISTEN_FDS").unwrap_or(0) < 1 {
        return Ok(None);
    }
    // SAFETY: by the socket-activation protocol fd 3 is open and given to
    // this process, which takes it over once, here (LISTEN_PID is ours).
    let socket = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(FIRST) };
    let udp = socket.r#type().is_ok_and(|t| t == Type::DGRAM)
        && socket
            .local_addr()
            .is_ok_and(|a| a.is_ipv4() || a.is_ipv6());
    if !udp {
        // Not ours to close, even when it is no socket at all: leave it.
        std::mem::forget(socket);
        return Err(io::Error::other(
            "the socket systemd passed (fd 3) is not a UDP socket",
        ));
    }
    socket.set_cloexec(true)?;
    Ok(Some(socket.into()))
}

/// Whether a failed receive on a socket with a read timeout only means
/// "nothing yet" (timed out, or interrupted by a signal): try again.
pub fn nothing_yet(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// The receive buffer the kernel granted `socket`, in the bytes asked for
/// (it reports twice that, counting its own bookkeeping).
pub fn recv_buffer_len(socket: &UdpSocket) -> io::Result<usize> {
    Ok(socket2::SockRef::from(socket).recv_buffer_size()? / 2)
}

/// Datagrams (or netlink messages) the kernel dropped on `socket` since it
/// was opened because its receive buffer was full: `SK_MEMINFO_DROPS` of
/// `SO_MEMINFO`. It is the
/// counter `SO_RXQ_OVFL` reports, but readable at any time, where that
/// control message comes only with the next datagram queued after a drop.
/// `None` on kernels before 4.7, which lack the entry.
pub fn socket_drops(socket: impl AsFd) -> io::Result<Option<u32>> {
    let mut meminfo = [0u8; 64];
    let mut len = meminfo.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `meminfo` and
    // stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (len as usize).min(meminfo.len());
    let at = SK_MEMINFO_DROPS * 4;
    Ok(meminfo[..len]
        .get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
}
