//! Netlinker threads (per dump, `Config::dumps`): receive the reply
//! datagrams of their dump's netlink sockets (one per namespace polled)
//! into pooled buffers and hand whole buffers to the inetdiagers, a batch
//! at a time.
//!
//! A netlinker sleeps in `epoll_wait(2)` on the dump's sockets and the
//! shutdown release fd, so it costs nothing between polls and exits at once
//! when released. The kernel builds each next datagram inside `recv`, in the
//! calling thread. Several netlinkers on one socket take datagrams in turn
//! (`MSG_DONTWAIT`: the loser of a race goes back to waiting). A netlinker
//! walks only the message headers: it drops datagrams of no current dump,
//! notes `NLMSG_DONE`, errors and `NLM_F_DUMP_INTR`, and retires the dump when
//! it ends.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{select, Sender, TrySendError};
use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollTimeout};

use crate::config::{Config, Family};
use crate::counting::DumpTotals;
use crate::pipeline::dump::Dump;
use crate::pipeline::family::{FamilyState, RELEASE_TOKEN};
use crate::pipeline::pool::PooledBuf;
use crate::pipeline::sock_diag::{scan_datagram, DumpError, SockDiagSocket};
use crate::shutdown::Shutdown;
use crate::wire::message::datagram_seq;

/// One received reply datagram on its way to an inetdiager.
pub struct ReceivedDatagram {
    pub buf: PooledBuf,
    pub len: usize,
    pub dump: Arc<Dump>,
}

/// Datagrams handed to an inetdiager at once. The kernel builds each next
/// datagram inside `recv`, so a dump's datagrams come back to back, and the
/// inetdiager, faster than the kernel, would otherwise sleep and be woken
/// for every one of them (`docs/performance.md`).
pub const HANDOFF_BATCH: usize = 8;

/// What goes down the channel: up to [`HANDOFF_BATCH`] datagrams, all of
/// one dump.
pub type Batch = Vec<ReceivedDatagram>;

/// Batches the channel of a dump's netlinkers and inetdiagers holds:
/// `--channel-size` receive buffers.
pub fn channel_batches(config: &Config) -> usize {
    config.channel_size.div_ceil(HANDOFF_BATCH)
}

/// Receive buffers a dump's pool may allocate: a full batch in the
/// channel's every slot, in each netlinker's hands and in each inetdiager's,
/// so that a netlinker waits on the channel, never on the pool.
pub fn pool_capacity(config: &Config, family: &Family) -> usize {
    (channel_batches(config) + family.netlinkers + family.inetdiagers) * HANDOFF_BATCH
}

pub fn run(family: &FamilyState, tx: Sender<Batch>, shutdown: &Shutdown) {
    let mut batch = Batch::with_capacity(HANDOFF_BATCH);
    loop {
        // A batch is handed over when full, and before the netlinker would
        // sleep: held, it would keep its dump from finishing.
        // The namespace of the batch in hand goes on while it has
        // datagrams, so that batches stay full with dumps side by side.
        let holding = batch.first().map(|r| r.dump.stamp.netns_inode);
        let (token, socket) = match wait_readable(family, holding) {
            Ok(Ready::Socket(token, socket)) => (token, socket),
            Ok(Ready::Released) => {
                hand_over(family, &tx, &mut batch, shutdown);
                return;
            }
            Ok(Ready::Nothing) => {
                if !hand_over(family, &tx, &mut batch, shutdown) {
                    return;
                }
                continue;
            }
            Err(e) => {
                shutdown.abort(format!(
                    "netlinker {}: epoll_wait(2) failed: {e}",
                    family.family.name()
                ));
                return;
            }
        };
        // Cloned before `recv`: a datagram received after this belongs to
        // this dump or is stale, never to a later one (the next dump starts
        // only once every clone of this one is dropped), and the dump cannot
        // be retired by another netlinker's NLMSG_DONE in between.
        let dump = family.current(token);
        let Some(mut buf) = family.pool.get(shutdown.abort_signal()) else {
            return;
        };
        let began = Instant::now();
        let received = socket.recv(&mut buf, false);
        let took = began.elapsed();
        let len = match received {
            Ok(len) => len,
            Err(DumpError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // A truncated or refused datagram is lost; the dump goes on.
                if let Some(dump) = &dump {
                    dump.counters.count(|t| &mut t.receive_errors);
                    dump.note_error("netlink receive", e);
                }
                continue;
            }
        };
        let Some((dump, sockets)) = claim(family, token, &socket, dump, &buf[..len]) else {
            continue;
        };
        dump.add_kernel_time(took);
        family.active();
        if sockets {
            // A batch holds one dump: the tail of the last one goes first.
            let other = batch.first().is_some_and(|r| !Arc::ptr_eq(&r.dump, &dump));
            if other && !hand_over(family, &tx, &mut batch, shutdown) {
                return;
            }
            batch.push(ReceivedDatagram { buf, len, dump });
            if batch.len() == HANDOFF_BATCH && !hand_over(family, &tx, &mut batch, shutdown) {
                return;
            }
        }
    }
}

/// The dump `datagram` belongs to, counted into it (and marked done at
/// `NLMSG_DONE`), and whether it holds sockets; `None` for a stale or
/// malformed datagram, counted as such.
fn claim(
    family: &FamilyState,
    token: u64,
    socket: &Arc<SockDiagSocket>,
    cloned: Option<Arc<Dump>>,
    datagram: &[u8],
) -> Option<(Arc<Dump>, bool)> {
    // The datagram's dump: normally `cloned`, taken before the receive. If that was
    // none or an older one (woken by the tail of an abandoned dump while
    // the poller started the next), look again: the next dump is
    // published before its request is sent. Sequence numbers are per
    // socket, so the socket must be the dump's too.
    let seq = datagram_seq(datagram);
    let ours = |d: &Arc<Dump>| Some(d.seq) == seq && Arc::ptr_eq(&d.socket, socket);
    let dump = match cloned {
        Some(d) if ours(&d) => d,
        _ => match family.current(token) {
            Some(d) if ours(&d) => d,
            _ => {
                family.stale_datagrams.fetch_add(1, Relaxed);
                return None;
            }
        },
    };
    let scan = match scan_datagram(datagram, dump.seq, |_| {}) {
        Ok(Some(scan)) => scan,
        Ok(None) => {
            family.stale_datagrams.fetch_add(1, Relaxed);
            return None;
        }
        Err(e) => {
            dump.counters.count(|t| &mut t.malformed);
            dump.note_error("malformed netlink datagram", e);
            return None;
        }
    };
    dump.progressed();
    let mut tally = DumpTotals {
        datagrams: 1,
        bytes: datagram.len() as u64,
        messages: u64::from(scan.messages),
        sockets: u64::from(scan.sockets),
        interrupted: u64::from(scan.interrupted),
        ..DumpTotals::default()
    };
    if let Some(errno) = scan.kernel_errno {
        tally.kernel_errors = 1;
        dump.note_error("kernel", io::Error::from_raw_os_error(-errno));
    }
    if scan.done {
        dump.mark_done();
        family.retire(&dump);
    }
    dump.counters.add(&tally);
    Some((dump, scan.sockets > 0))
}

/// What [`wait_readable`] found.
enum Ready {
    /// A socket with a datagram, and its epoll token.
    Socket(u64, Arc<SockDiagSocket>),
    /// Nothing yet, and the caller asked not to wait.
    Nothing,
    /// The netlinkers are released: exit.
    Released,
}

/// Waits until one of the family's sockets has a datagram and returns it
/// with its token, `holding`'s if it is ready; while `holding` a batch,
/// returns at once. Level-triggered: a socket another netlinker drains
/// first makes `recv` say `WouldBlock`.
fn wait_readable(family: &FamilyState, holding: Option<u64>) -> Result<Ready, Errno> {
    let mut events = [EpollEvent::empty(); 4];
    let poll_only = holding.is_some();
    let timeout = if poll_only {
        EpollTimeout::ZERO
    } else {
        EpollTimeout::NONE
    };
    loop {
        let n = match family.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let ready = &events[..n];
        if ready.iter().any(|e| e.data() == RELEASE_TOKEN) {
            return Ok(Ready::Released);
        }
        // A socket removed since the event (its namespace went) is skipped.
        let tokens = ready.iter().map(EpollEvent::data);
        let held = tokens.clone().filter(|&t| Some(t) == holding);
        let socket = held
            .chain(tokens)
            .find_map(|t| Some((t, family.socket(t)?)));
        if let Some((token, socket)) = socket {
            return Ok(Ready::Socket(token, socket));
        }
        if poll_only {
            return Ok(Ready::Nothing);
        }
    }
}

/// Sends the batch (leaving it empty), waiting while the channel is full:
/// counted, with its dump's timeout clock stopped (the output is slow, not
/// the kernel). `false` when the pipeline is aborting or the inetdiagers
/// are gone.
fn hand_over(
    family: &FamilyState,
    tx: &Sender<Batch>,
    batch: &mut Batch,
    shutdown: &Shutdown,
) -> bool {
    let Some(dump) = batch.first().map(|r| Arc::clone(&r.dump)) else {
        return true;
    };
    let full = std::mem::replace(batch, Batch::with_capacity(HANDOFF_BATCH));
    let full = match tx.try_send(full) {
        Ok(()) => return true,
        Err(TrySendError::Disconnected(_)) => return false,
        Err(TrySendError::Full(full)) => full,
    };
    let _blocked = dump.blocked_on_output();
    let _waiting = family.waiting_on_output();
    let started = Instant::now();
    let sent = select! {
        send(tx, full) -> r => r.is_ok(),
        recv(shutdown.abort_signal()) -> _ => false,
    };
    dump.counters.add(&DumpTotals {
        channel_full: 1,
        channel_blocked_ns: started.elapsed().as_nanos() as u64,
        ..DumpTotals::default()
    });
    sent
}
