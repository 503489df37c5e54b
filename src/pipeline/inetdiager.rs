//! Inetdiager threads (`--inetdiagers4/6` per family): walk the socket
//! messages of each received buffer, sample, decode, encode each record into
//! a reused buffer and hand it to the destination; then flush and return the
//! buffer to its pool. They exit when every netlinker of their family is gone
//! and the channel is drained, so nothing received is left unsent.

use std::io;

use crossbeam_channel::Receiver;

use crate::counting::{DumpTotals, TcpInfoLengths};
use crate::export::record::RecordEncoder;
use crate::export::sink::Sink;
use crate::pipeline::netlinker::ReceivedDatagram;
use crate::pipeline::sample::Sampler;
use crate::pipeline::sock_diag::scan_datagram;
use crate::shutdown::Shutdown;
use crate::wire::{decode_socket, TailLayout};

pub struct Inetdiager {
    pub encoder: RecordEncoder,
    pub sink: Sink,
    pub sampler: Sampler,
    pub tail: TailLayout,
}

impl Inetdiager {
    pub fn run(mut self, rx: Receiver<ReceivedDatagram>, shutdown: &Shutdown) {
        let mut record = vec![0u8; self.encoder.max_record_len()];
        // After stdout closed (`xtcp --dest stdout | head`) records are dropped.
        let mut output_closed = false;
        for received in rx.iter() {
            if shutdown.is_aborted() {
                return;
            }
            let dump = &received.dump;
            let mut tally = DumpTotals::default();
            let datagram = &received.buf[..received.len];
            let sampler = self.sampler;
            // The netlinker already framed this datagram and checked its
            // sequence number, so neither can fail here. Counting first lets
            // the encoder take this buffer's record numbers in one block.
            let _ = scan_datagram(datagram, dump.seq, |payload| {
                if sampler.keep_message(payload) {
                    tally.sampled += 1;
                } else {
                    tally.unsampled += 1;
                }
            });
            if output_closed {
                // The datagram is dropped: its buffer goes back to the pool.
                tally.output_closed = tally.sampled;
                dump.counters.add(&tally);
                continue;
            }
            self.encoder.reserve(tally.sampled);
            let mut lengths = TcpInfoLengths::default();
            let mut output_error = None;
            let _ = scan_datagram(datagram, dump.seq, |payload| {
                if !sampler.keep_message(payload) {
                    return;
                }
                if output_error.is_some() {
                    tally.output_closed += 1;
                    return;
                }
                let socket = match decode_socket(payload, self.tail) {
                    Ok(socket) => socket,
                    Err(e) => {
                        tally.decode_errors += 1;
                        dump.note_error("decode", e);
                        return;
                    }
                };
                tally.unknown_attributes += u64::from(socket.unknown_attributes);
                lengths.add(socket.tcp_info.map(|t| t.len()), 1);
                let Some(len) = self.encoder.encode(&socket, &dump.stamp, &mut record) else {
                    tally.encode_errors += 1;
                    return;
                };
                tally.records += 1;
                if let Err(e) = self.sink.record(&record[..len]) {
                    output_error = Some(e);
                }
            });
            let flushed = match output_error {
                Some(e) => Err(e),
                None => self.sink.flush(),
            };
            if let Err(e) = flushed {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    output_closed = true;
                    shutdown.stop();
                } else {
                    shutdown.abort(format!("writing records: {e}"));
                    return;
                }
            }
            let sent = self.sink.take_tally();
            tally.sent_datagrams = sent.datagrams;
            tally.sent_bytes = sent.bytes;
            tally.send_errors = sent.errors;
            tally.records_lost = sent.records_lost;
            if let Some(e) = sent.first_error {
                dump.note_error("send", e);
            }
            dump.counters.add(&tally);
            dump.add_tcp_info_lengths(&lengths);
        }
    }
}
