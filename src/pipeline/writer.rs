//! The record writer: what turns the socket messages of netlink datagrams
//! into records at the destination. The inetdiagers write a dump's
//! datagrams with it, the closer the kernel's close messages, `--replay` a
//! dump file's.

use std::io;
use std::sync::Arc;

use crate::aggregate::Accumulator;
use crate::counting::{DumpTotals, TcpInfoLengths};
use crate::export::record::{PollStamp, RecordEncoder};
use crate::export::sink::Sink;
use crate::pipeline::changes::ChangeTracker;
use crate::pipeline::sample::Sampler;
use crate::pipeline::sock_diag::scan_datagram;
use crate::wire::inet_diag::INET_DIAG_MSG_LEN;
use crate::wire::message::NLMSG_HDRLEN;
use crate::wire::{decode_socket, TailLayout, WireError};

/// The shortest socket message that decodes. Sizes the per-buffer list of
/// decoded sockets so it never grows.
const SMALLEST_SOCKET_MESSAGE: usize = NLMSG_HDRLEN + INET_DIAG_MSG_LEN;

/// Turns the socket messages of netlink datagrams into records at the
/// destination: samples, decodes, numbers, encodes and sends. What the
/// inetdiagers do with a dump's datagrams, and the closer with the
/// kernel's close messages.
pub struct RecordWriter {
    pub encoder: RecordEncoder,
    pub sink: Sink,
    pub sampler: Sampler,
    pub tail: TailLayout,
    /// With `--changes-only`: which sockets a poll exports, and as what.
    pub changes: Option<Arc<ChangeTracker>>,
    /// The per-service aggregates, which count every sampled socket
    /// whether it is exported or not.
    pub aggregate: Option<Accumulator>,
    /// One record, reused.
    record: Vec<u8>,
}

impl RecordWriter {
    pub fn new(encoder: RecordEncoder, sink: Sink, sampler: Sampler, tail: TailLayout) -> Self {
        let record = vec![0u8; encoder.max_record_len()];
        RecordWriter {
            encoder,
            sink,
            sampler,
            tail,
            changes: None,
            aggregate: None,
            record,
        }
    }

    /// Hands the sampled sockets of `datagram` (messages with sequence
    /// number `seq`) to the sink as records stamped `stamp`, without
    /// flushing; counts into `tally` and `lengths`, and gives each decode
    /// error to `on_decode_error`. Fails with the sink's first error (only
    /// stdout fails here), after which the rest count as `output_closed`.
    pub fn write_datagram(
        &mut self,
        datagram: &[u8],
        seq: u32,
        stamp: &PollStamp,
        tally: &mut DumpTotals,
        lengths: &mut TcpInfoLengths,
        mut on_decode_error: impl FnMut(WireError),
    ) -> io::Result<()> {
        let (sampler, tail) = (self.sampler, self.tail);
        // Decode first, encode after: the encoder then takes exactly one
        // record number per decoded socket, in one block per datagram, so a
        // run's numbers have no gaps.
        let mut sockets = Vec::with_capacity(datagram.len() / SMALLEST_SOCKET_MESSAGE);
        let _ = scan_datagram(datagram, seq, |payload| {
            if !sampler.keep_message(payload) {
                tally.unsampled += 1;
                return;
            }
            tally.sampled += 1;
            match decode_socket(payload, tail) {
                Ok(socket) => {
                    tally.unknown_attributes += u64::from(socket.unknown_attributes);
                    lengths.add(socket.tcp_info.map(|t| t.len()), 1);
                    sockets.push((socket, stamp.kind));
                }
                Err(e) => {
                    tally.decode_errors += 1;
                    on_decode_error(e);
                }
            }
        });
        if let Some(aggregate) = &mut self.aggregate {
            aggregate.add(stamp, sockets.iter().map(|(socket, _)| socket));
        }
        if let Some(changes) = &self.changes {
            sockets.retain_mut(|(socket, kind)| {
                match changes.classify(stamp.netns_inode, socket, stamp.poll_id) {
                    Some(k) => {
                        *kind = k;
                        true
                    }
                    None => {
                        tally.unchanged += 1;
                        false
                    }
                }
            });
        }
        self.encoder.reserve(sockets.len() as u64);
        // The stamp of each kind other than `stamp`'s, made once.
        let mut kinded: Vec<PollStamp> = Vec::new();
        let mut result = Ok(());
        for (socket, kind) in &sockets {
            if result.is_err() {
                tally.output_closed += 1;
                continue;
            }
            let stamp = if *kind == stamp.kind {
                stamp
            } else {
                if !kinded.iter().any(|s| s.kind == *kind) {
                    kinded.push(PollStamp {
                        kind: *kind,
                        ..stamp.clone()
                    });
                }
                kinded.iter().find(|s| s.kind == *kind).unwrap_or(stamp)
            };
            let Some(len) = self.encoder.encode(socket, stamp, &mut self.record) else {
                tally.encode_errors += 1;
                continue;
            };
            tally.records += 1;
            result = self.sink.record(&self.record[..len]);
        }
        result
    }

    /// Counts the sockets of a datagram dropped whole once the output is
    /// closed.
    pub fn skip_datagram(&self, datagram: &[u8], seq: u32, tally: &mut DumpTotals) {
        let _ = scan_datagram(datagram, seq, |payload| {
            if self.sampler.keep_message(payload) {
                tally.sampled += 1;
                tally.output_closed += 1;
            } else {
                tally.unsampled += 1;
            }
        });
    }

    /// Hands the aggregates what the writes counted, sends what is pending
    /// unless `written` already failed, and moves the sends' tally into
    /// `tally`. Returns the output's error (stdout), and
    /// the first failed send (UDP, counted, not fatal).
    pub fn flush(
        &mut self,
        written: io::Result<()>,
        tally: &mut DumpTotals,
    ) -> (io::Result<()>, Option<io::Error>) {
        if let Some(aggregate) = &mut self.aggregate {
            aggregate.flush();
        }
        let flushed = written.and_then(|()| self.sink.flush());
        let sent = self.sink.take_tally();
        tally.sent_datagrams += sent.datagrams;
        tally.sent_bytes += sent.bytes;
        tally.send_errors += sent.errors;
        tally.records_lost += sent.records_lost;
        (flushed, sent.first_error)
    }
}
