//! xtcp's test kit: a known set of TCP sockets in a private network
//! namespace, for the integration tests (`tests/it`), the socket farm of the
//! benchmarks (`xtcp-socket-farm`) and the recapture of `tests/fixtures/`
//! (`xtcp-capture-fixtures`); and `xtcp-dump-floor`, the kernel's own cost of
//! a poll. Development tools only: nothing here is installed.
//!
//! Needs root (it runs `ip netns`). Ports are fixed, which a private
//! namespace allows, so captures and assertions are repeatable.

pub mod harness;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
};

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> io::Result<()> {
    run_ip(Command::new("ip").args(args), args)
}

fn run_ip(cmd: &mut Command, args: &[&str]) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {} (needs root and iproute2)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Netns {
    /// Creates `xtcp-<tag>-<pid>` with its loopback up, and its ephemeral
    /// ports ([`EPHEMERAL_PORTS`]) above every fixed port the tests and
    /// benches bind, so a port a test's server binds is never one a client
    /// of a farm was given.
    pub fn create(tag: &str) -> io::Result<Netns> {
        Self::create_with(tag, |name| ip(&["netns", "add", name]))
    }

    /// [`Self::create`] from inside `parent`, whose sysctls a new namespace
    /// reads as it is made (`net.ipv4.tcp_child_ehash_entries`: its own TCP
    /// table), leaving the host's untouched. `nsenter` switches only the
    /// network namespace, so the name is mounted where the host sees it.
    pub fn create_in(parent: &Netns, tag: &str) -> io::Result<Netns> {
        Self::create_with(tag, |name| {
            let args = ["netns", "add", name];
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{}", parent.name))
                .arg("ip")
                .args(args);
            run_ip(&mut cmd, &args)
        })
    }

    fn create_with(tag: &str, add: impl FnOnce(&str) -> io::Result<()>) -> io::Result<Netns> {
        let name = format!("xtcp-{tag}-{}", std::process::id());
        // A namespace left by a killed earlier run of the same pid: replace it.
        let _ = ip(&["netns", "del", &name]);
        add(&name)?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        let (low, high) = EPHEMERAL_PORTS;
        ns.sysctl("net.ipv4.ip_local_port_range", &format!("{low} {high}"))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program args` run inside the namespace (`ip netns exec`, which
    /// execs it: the child is the program).
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        cmd
    }

    /// Writes `value` to the namespace's sysctl `key` (`net.ipv4.x`).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let setting = format!("{key}={value}");
        ip(&["netns", "exec", &self.name, "sysctl", "-q", "-w", &setting])
    }

    /// The namespace's inode, as records carry it in `netns_inode`.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(format!("/run/netns/{}", self.name))?.ino())
    }

    /// Moves the calling thread into the namespace: sockets it opens from now
    /// on, and threads it spawns, live there.
    pub fn enter(&self) -> io::Result<()> {
        let f = File::open(format!("/run/netns/{}", self.name))?;
        setns(f, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The ports a namespace of [`Netns::create`] gives clients: the fixed
/// ports (listeners from 20001 and 40001, scenario clients at 30001, 41001
/// and 42001, close-test clients from 20000, the receivers' 13000, metrics
/// 9000 and 9001, the broker's 9092) are all below. 18000 ports, half of
/// them even (`connect` tries those first), are plenty for a farm's worker
/// of at most 9000 connections to one listener.
pub const EPHEMERAL_PORTS: (u16, u16) = (43000, 60999);

pub const LISTEN_PORT: u16 = 40001;
pub const STATE_ESTABLISHED: u32 = 1;
pub const STATE_TIME_WAIT: u32 = 6;
pub const STATE_LISTEN: u32 = 10;
/// Bytes the client writes to the server on every established pair.
pub const CLIENT_BYTES: usize = 3000;
/// Bytes the server answers with.
pub const SERVER_BYTES: usize = 1000;
/// DSCP AF11 (0x0a << 2): ECN bits clear, as the kernel masks them for TCP.
pub const TOS: u8 = 0x28;

/// What the dump must report for one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedSocket {
    pub family: u32,
    pub state: u32,
    pub source_port: u16,
    pub destination_port: u16,
    /// (bytes_sent, bytes_received) of tcp_info for established sockets.
    pub bytes: Option<(u64, u64)>,
    /// Congestion control name for sockets that carry tcp_info.
    pub congestion: Option<String>,
    /// TOS (IPv4) or traffic class (IPv6) byte for sockets that carry it.
    pub tos: Option<u8>,
}

impl ExpectedSocket {
    pub fn key(&self) -> (u32, u32, u16, u16) {
        (
            self.family,
            self.state,
            self.source_port,
            self.destination_port,
        )
    }
}

/// The sockets of one family, held open until dropped.
pub struct Scenario {
    pub expected: Vec<ExpectedSocket>,
    _open: Vec<TcpStream>,
    _listener: TcpListener,
}

/// Client settings for one established pair.
enum Tweak {
    None,
    Congestion,
    Tos,
}

/// Opens, for one family on loopback, from inside the current namespace:
/// a listener on 40001; three established pairs (plain, cubic, TOS/TCLASS),
/// each with 3000 bytes sent by the client and 1000 by the server; and one
/// client in TIME_WAIT. `client_base` picks the client ports (base+1..base+4).
pub fn open(v6: bool, client_base: u16) -> io::Result<Scenario> {
    let default_cc = default_congestion()?;
    let other_cc = other_congestion(&default_cc);
    let host: IpAddr = if v6 {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u32;
    let listener = TcpListener::bind(SocketAddr::new(host, LISTEN_PORT))?;
    let server = SocketAddr::new(host, LISTEN_PORT);
    let mut expected = vec![ExpectedSocket {
        family,
        state: STATE_LISTEN,
        source_port: LISTEN_PORT,
        destination_port: 0,
        bytes: None,
        congestion: Some(default_cc.clone()),
        tos: Some(0),
    }];
    let mut open = Vec::new();
    for (i, tweak) in [Tweak::None, Tweak::Congestion, Tweak::Tos]
        .into_iter()
        .enumerate()
    {
        let port = client_base + 1 + i as u16;
        let mut client = connect_from(SocketAddr::new(host, port), server, &tweak, other_cc, v6)?;
        let (mut accepted, _) = listener.accept()?;
        let mut buf = vec![0u8; CLIENT_BYTES];
        client.write_all(&buf[..CLIENT_BYTES])?;
        accepted.read_exact(&mut buf[..CLIENT_BYTES])?;
        accepted.write_all(&buf[..SERVER_BYTES])?;
        client.read_exact(&mut buf[..SERVER_BYTES])?;
        let (cc, tos) = match tweak {
            Tweak::None => (default_cc.as_str(), 0),
            Tweak::Congestion => (other_cc, 0),
            Tweak::Tos => (default_cc.as_str(), TOS),
        };
        let established =
            |(source_port, destination_port), (sent, received), cc: &str, tos| ExpectedSocket {
                family,
                state: STATE_ESTABLISHED,
                source_port,
                destination_port,
                bytes: Some((sent as u64, received as u64)),
                congestion: Some(cc.to_string()),
                tos: Some(tos),
            };
        expected.push(established(
            (port, LISTEN_PORT),
            (CLIENT_BYTES, SERVER_BYTES),
            cc,
            tos,
        ));
        expected.push(established(
            (LISTEN_PORT, port),
            (SERVER_BYTES, CLIENT_BYTES),
            &default_cc,
            0,
        ));
        open.push(client);
        open.push(accepted);
    }
    // TIME_WAIT: the side that closes first keeps the 4-tuple for 60 s; the
    // server side is gone once its FIN is acked.
    let tw_port = client_base + 4;
    let client = connect_from(
        SocketAddr::new(host, tw_port),
        server,
        &Tweak::None,
        other_cc,
        v6,
    )?;
    let (mut accepted, _) = listener.accept()?;
    drop(client);
    let mut sink = Vec::new();
    accepted.read_to_end(&mut sink)?;
    drop(accepted);
    expected.push(ExpectedSocket {
        family,
        state: STATE_TIME_WAIT,
        source_port: tw_port,
        destination_port: LISTEN_PORT,
        bytes: None,
        congestion: None,
        tos: None,
    });
    settle(v6, tw_port)?;
    Ok(Scenario {
        expected,
        _open: open,
        _listener: listener,
    })
}

/// Waits until the scenario's sockets reach the states it promises: every
/// byte acked (delayed ACKs landed), the TIME_WAIT client in TIME_WAIT and
/// its server end gone. On a loaded host the softirq work that moves them
/// can lag the syscalls by hundreds of milliseconds, and a dump taken in
/// between sees a socket in FIN_WAIT2, or none while it changes places in
/// the kernel's hash. Reads `/proc/thread-self/net`, the calling thread's
/// namespace (`/proc/net` is the process's).
fn settle(v6: bool, tw_port: u16) -> io::Result<()> {
    const TIME_WAIT: u8 = STATE_TIME_WAIT as u8;
    let path = format!("/proc/thread-self/net/tcp{}", if v6 { "6" } else { "" });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let table = std::fs::read_to_string(&path)?;
        let rows: Vec<ProcTcpRow> = table
            .lines()
            .skip(1)
            .filter_map(ProcTcpRow::parse)
            .collect();
        let settled = rows.iter().all(|r| r.queued == 0)
            && rows
                .iter()
                .any(|r| r.local_port == tw_port && r.state == TIME_WAIT)
            && !rows
                .iter()
                .any(|r| r.local_port == LISTEN_PORT && r.remote_port == tw_port);
        if settled {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "the scenario's sockets did not settle in 30 s: {rows:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The parts of a `/proc/net/tcp` line [`settle`] needs.
#[derive(Debug)]
struct ProcTcpRow {
    local_port: u16,
    remote_port: u16,
    state: u8,
    /// Bytes not yet acked plus bytes not yet read (the accept backlog of a
    /// listener).
    queued: u64,
}

impl ProcTcpRow {
    /// `sl local rem st tx_queue:rx_queue ...`, addresses as `HEX:PORT`.
    fn parse(line: &str) -> Option<Self> {
        let mut fields = line.split_whitespace().skip(1);
        let port = |addr: &str| u16::from_str_radix(addr.rsplit_once(':')?.1, 16).ok();
        let local_port = port(fields.next()?)?;
        let remote_port = port(fields.next()?)?;
        let state = u8::from_str_radix(fields.next()?, 16).ok()?;
        let (tx, rx) = fields.next()?.split_once(':')?;
        let queued = u64::from_str_radix(tx, 16).ok()? + u64::from_str_radix(rx, 16).ok()?;
        Some(Self {
            local_port,
            remote_port,
            state,
            queued,
        })
    }
}

fn connect_from(
    local: SocketAddr,
    remote: SocketAddr,
    tweak: &Tweak,
    other_cc: &str,
    v6: bool,
) -> io::Result<TcpStream> {
    let af = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd: OwnedFd = socket(af, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    match tweak {
        Tweak::None => {}
        Tweak::Congestion => setsockopt(&fd, sockopt::TcpCongestion, &other_cc.into())?,
        Tweak::Tos if v6 => setsockopt(&fd, sockopt::Ipv6TClass, &i32::from(TOS))?,
        Tweak::Tos => setsockopt(&fd, sockopt::Ipv4Tos, &i32::from(TOS))?,
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(remote))?;
    Ok(TcpStream::from(fd))
}

/// The kernel's default congestion control inside the current namespace.
pub fn default_congestion() -> io::Result<String> {
    Ok(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")?
            .trim()
            .to_string(),
    )
}

/// An always-built-in algorithm other than the default, set on one client.
pub fn other_congestion(default_cc: &str) -> &'static str {
    if default_cc == "cubic" {
        "reno"
    } else {
        "cubic"
    }
}

/// Many established loopback connections on one listener, held open.
pub struct Pairs {
    pub listener: TcpListener,
    /// Client and accepted server ends, alternating.
    pub streams: Vec<TcpStream>,
}

impl Pairs {
    /// `(family, source port, destination port)` of every socket, listener
    /// included: what a dump of the namespace must report.
    pub fn keys(&self) -> io::Result<Vec<(u32, u16, u16)>> {
        let listen = self.listener.local_addr()?;
        let mut keys = vec![(family_of(&listen), listen.port(), 0)];
        for s in &self.streams {
            let (local, peer) = (s.local_addr()?, s.peer_addr()?);
            keys.push((family_of(&local), local.port(), peer.port()));
        }
        Ok(keys)
    }
}

fn family_of(addr: &SocketAddr) -> u32 {
    (if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    }) as u32
}

/// Opens `pairs` established connections to a new listener on `server`,
/// from inside the current namespace. With `exchange`, each pair sends 100
/// bytes both ways so the byte and segment counters are not zero.
pub fn established_pairs(server: SocketAddr, pairs: usize, exchange: bool) -> io::Result<Pairs> {
    let listener = TcpListener::bind(server)?;
    let mut streams = Vec::with_capacity(2 * pairs);
    for _ in 0..pairs {
        let mut client = TcpStream::connect(server)?;
        let (mut accepted, _) = listener.accept()?;
        if exchange {
            let mut buf = [7u8; 100];
            client.write_all(&buf)?;
            accepted.read_exact(&mut buf)?;
            accepted.write_all(&buf)?;
            client.read_exact(&mut buf)?;
        }
        streams.extend([client, accepted]);
    }
    Ok(Pairs { listener, streams })
}

/// One connection that [`closed_connections`] opened, sent over and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    pub family: u32,
    pub client_port: u16,
    pub server_port: u16,
    /// Bytes the client sent (and the server read) before the close.
    pub bytes: u64,
    /// Whether the server closed first (else the client did).
    pub server_first: bool,
}

/// Opens `n` connections to a new listener on `server` (in batches, so
/// few descriptors are open at once), sends `bytes(i)` from each client to
/// the server, which reads them all, then closes both ends: the server
/// first where `server_first(i)`, else the client. The listener is closed
/// last. Client `i` binds port `first_client_port + i`, so no two
/// connections share their ports (the kernel would reuse an ephemeral port
/// whose connection is in TIME_WAIT only on the server's side). Returns what
/// was done, connection by connection.
pub fn closed_connections(
    server: SocketAddr,
    n: usize,
    first_client_port: u16,
    bytes: impl Fn(usize) -> u64,
    server_first: impl Fn(usize) -> bool,
) -> io::Result<Vec<Closed>> {
    const BATCH: usize = 500;
    let listener = TcpListener::bind(server)?;
    let server_port = listener.local_addr()?.port();
    let mut done = Vec::with_capacity(n);
    let mut data = Vec::new();
    for start in (0..n).step_by(BATCH) {
        let mut open = Vec::with_capacity(BATCH);
        for i in start..n.min(start + BATCH) {
            let port = u16::try_from(i)
                .ok()
                .and_then(|i| first_client_port.checked_add(i))
                .ok_or_else(|| io::Error::other("client ports past 65535"))?;
            let local = SocketAddr::new(server.ip(), port);
            let mut client = connect_from(local, server, &Tweak::None, "", server.is_ipv6())?;
            let (mut accepted, _) = listener.accept()?;
            let len = bytes(i);
            data.resize(len as usize, 0x5a);
            client.write_all(&data)?;
            accepted.read_exact(&mut data)?;
            let local = client.local_addr()?;
            done.push(Closed {
                family: family_of(&local),
                client_port: local.port(),
                server_port,
                bytes: len,
                server_first: server_first(i),
            });
            open.push((client, accepted, server_first(i)));
        }
        for (client, accepted, server_first) in open {
            if server_first {
                drop(accepted);
                drop(client);
            } else {
                drop(client);
                drop(accepted);
            }
        }
    }
    Ok(done)
}
