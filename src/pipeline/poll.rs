//! One poll: dump every enabled family, decode each socket, build its record
//! and hand it to the destination. Runs on the calling thread.

use std::io;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Config, Dest};
use crate::export::record::{PollStamp, RecordEncoder};
use crate::export::stdout::StdoutSink;
use crate::pipeline::netlink::{DumpError, DumpStats, SockDiagSocket, RECV_BUFFER_LEN};
use crate::wire::{decode_socket, TailLayout, WireError};

/// What to ask the kernel for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpSpec {
    /// AF_INET and/or AF_INET6, dumped in this order.
    pub families: Vec<u8>,
    /// `1 << state` bits.
    pub states: u32,
    /// `1 << (INET_DIAG_X - 1)` bits.
    pub extensions: u8,
    /// How to read the last bytes of a 280-byte tcp_info.
    pub tail: TailLayout,
}

/// What one poll did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PollSummary {
    pub dumps: DumpStats,
    pub records: u64,
    /// Socket messages that failed to decode (counted, skipped).
    pub decode_errors: u64,
    /// The first decode error, to say what was wrong.
    pub first_decode_error: Option<WireError>,
    /// Records that did not fit the record buffer (never expected: the buffer
    /// is `RecordEncoder::max_record_len()` long). Counted, not emitted.
    pub encode_errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("dump of address family {family}: {source}")]
    Dump { family: u8, source: DumpError },
    #[error("writing records: {0}")]
    Output(io::Error),
}

/// Reusable state for polling: the socket, the receive and record buffers.
pub struct Poller {
    socket: SockDiagSocket,
    buf: Vec<u8>,
    encoder: RecordEncoder,
    record: Vec<u8>,
    spec: DumpSpec,
}

impl Poller {
    pub fn new(socket: SockDiagSocket, spec: DumpSpec, hostname: String) -> Self {
        let encoder = RecordEncoder::new(hostname);
        Poller {
            socket,
            buf: vec![0; RECV_BUFFER_LEN],
            record: vec![0; encoder.max_record_len()],
            encoder,
            spec,
        }
    }

    /// Dumps every family and calls `emit` with each socket's encoded
    /// `Record`. An `emit` error stops the poll and is returned.
    pub fn poll(
        &mut self,
        stamp: &PollStamp,
        mut emit: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<PollSummary, PollError> {
        let mut summary = PollSummary::default();
        let mut output_error = None;
        for &family in &self.spec.families {
            let dump_err = |source| PollError::Dump { family, source };
            let mut reader = self
                .socket
                .dump(family, self.spec.states, self.spec.extensions)
                .map_err(|e| dump_err(e.into()))?;
            while let Some(len) = reader.recv(&mut self.buf).map_err(dump_err)? {
                let (encoder, record) = (&mut self.encoder, &mut self.record);
                reader
                    .scan(&self.buf[..len], |payload| {
                        if output_error.is_some() {
                            return;
                        }
                        match decode_socket(payload, self.spec.tail) {
                            Ok(socket) => match encoder.encode(&socket, stamp, record) {
                                Some(len) => match emit(&record[..len]) {
                                    Ok(()) => summary.records += 1,
                                    Err(e) => output_error = Some(e),
                                },
                                None => summary.encode_errors += 1,
                            },
                            Err(e) => {
                                summary.decode_errors += 1;
                                summary.first_decode_error.get_or_insert(e);
                            }
                        }
                    })
                    .map_err(dump_err)?;
                if let Some(e) = output_error.take() {
                    return Err(PollError::Output(e));
                }
            }
            summary.dumps.add(&reader.stats());
        }
        Ok(summary)
    }
}

/// Why [`run`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("opening the netlink sock_diag socket: {0}")]
    Open(io::Error),
    #[error(transparent)]
    Poll(#[from] PollError),
}

/// Polls `config.max_loops` times (0 = until killed), one poll every
/// `config.frequency`, writing records to `config.dest`. A reader that goes
/// away (`xtcp ... | head`) ends the run quietly.
pub fn run(config: &Config) -> Result<(), RunError> {
    let socket = SockDiagSocket::open(config.netlink_timeout).map_err(RunError::Open)?;
    let spec = DumpSpec {
        families: config.families.clone(),
        states: config.states,
        extensions: config.extensions,
        tail: TailLayout::for_release(&kernel_release()),
    };
    let mut poller = Poller::new(socket, spec, hostname());
    // Irrefutable while stdout is the only destination; a new one must be wired here.
    let Dest::Stdout = config.dest;
    let mut sink = StdoutSink::default();
    for poll_id in 1.. {
        let started = Instant::now();
        let stamp = PollStamp {
            poll_id,
            timestamp_ns: unix_nanos(),
        };
        let result = poller
            .poll(&stamp, |r| sink.write(r))
            .and_then(|s| sink.flush().map(|()| s).map_err(PollError::Output));
        let summary = match result {
            Err(PollError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        };
        report(poll_id, &summary);
        if poll_id == config.max_loops {
            break;
        }
        std::thread::sleep(config.frequency.saturating_sub(started.elapsed()));
    }
    Ok(())
}

/// Problems worth a line on stderr; a clean poll prints nothing.
fn report(poll_id: u64, s: &PollSummary) {
    if let Some(e) = &s.first_decode_error {
        eprintln!(
            "warning: poll {poll_id}: {} of {} socket messages could not be decoded, first: {e}",
            s.decode_errors, s.dumps.sockets
        );
    }
    if s.encode_errors > 0 {
        eprintln!(
            "warning: poll {poll_id}: {} records were longer than the record buffer and were dropped",
            s.encode_errors
        );
    }
    if s.dumps.interrupted {
        eprintln!("warning: poll {poll_id}: the kernel flagged the dump as interrupted (NLM_F_DUMP_INTR): sockets may be missing or repeated");
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `uname -r`, which decides the tcp_info tail layout.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
