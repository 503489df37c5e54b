//! Inetdiager threads (per dump, `Config::dumps`): walk the socket messages
//! of each received batch of buffers, sample, decode, encode each record
//! into a reused buffer and hand it to the destination; then flush and
//! return the buffers to their pool. They exit when every netlinker of their
//! dump is gone and the channel is drained, so nothing received is left
//! unsent.

use std::io;
use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::counting::{DumpTotals, TcpInfoLengths};
use crate::pipeline::capture::Capture;
use crate::pipeline::netlinker::{Batch, ReceivedDatagram};
use crate::pipeline::writer::RecordWriter;
use crate::shutdown::Shutdown;

pub struct Inetdiager {
    pub writer: RecordWriter,
    /// `--capture`: where each datagram's socket messages are written too.
    pub capture: Option<Arc<Capture>>,
}

impl Inetdiager {
    pub fn run(mut self, rx: Receiver<Batch>, shutdown: &Shutdown) {
        // After stdout closed (`xtcp --dest stdout | head`) records are dropped.
        let mut output_closed = false;
        for batch in rx.iter() {
            if shutdown.is_aborted() {
                return;
            }
            match self.write_batch(&batch, output_closed) {
                Ok(()) => {}
                Err(Stop::OutputClosed) => {
                    output_closed = true;
                    shutdown.stop();
                }
                Err(Stop::Abort(reason)) => {
                    shutdown.abort(reason);
                    return;
                }
            }
        }
    }

    /// Writes the records of a batch (datagrams of one dump), sends them at
    /// once and counts into the dump; skips them when the output is closed.
    fn write_batch(&mut self, batch: &[ReceivedDatagram], output_closed: bool) -> Result<(), Stop> {
        let Some(dump) = batch.first().map(|r| &r.dump) else {
            return Ok(());
        };
        let mut tally = DumpTotals::default();
        let mut lengths = TcpInfoLengths::default();
        let mut written = Ok(());
        for received in batch {
            let datagram = &received.buf[..received.len];
            if output_closed || written.is_err() {
                // Dropped: the buffer goes back to the pool.
                self.writer.skip_datagram(datagram, dump.seq, &mut tally);
                continue;
            }
            if let Some(capture) = &self.capture {
                capture
                    .datagram(datagram)
                    .map_err(|e| Stop::Abort(format!("writing --capture: {e}")))?;
            }
            // The netlinker already framed this datagram and checked its
            // sequence number, so neither can fail here.
            let result = self.writer.write_datagram(
                datagram,
                dump.seq,
                &dump.stamp,
                &mut tally,
                &mut lengths,
                |e| dump.note_error("decode", e),
            );
            written = written.and(result);
        }
        let (flushed, send_error) = self.writer.flush(written, &mut tally);
        if let Some(e) = send_error {
            dump.note_error("send", e);
        }
        dump.counters.add(&tally);
        dump.add_tcp_info_lengths(&lengths);
        flushed.map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => Stop::OutputClosed,
            _ => Stop::Abort(format!("writing records: {e}")),
        })
    }
}

/// Why an inetdiager stops writing.
enum Stop {
    /// Stdout was closed (`| head`): the rest is dropped, counted.
    OutputClosed,
    /// A write that must not fail did: the pipeline aborts with this.
    Abort(String),
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::sync::Arc;
    use std::time::Duration;

    use crossbeam_channel::bounded;

    use super::*;
    use crate::config::Family;
    use crate::export::record::{PollStamp, RecordEncoder};
    use crate::export::sink::Sink;
    use crate::export::udp::UdpSink;
    use crate::identity::Identity;
    use crate::pipeline::dump::Dump;
    use crate::pipeline::pool::BufferPool;
    use crate::pipeline::sample::Sampler;
    use crate::pipeline::sock_diag::SockDiagSocket;
    use crate::wire::inet_diag::INET_DIAG_MSG_LEN;
    use crate::wire::message::NLMSG_HDRLEN;
    use crate::wire::message::{put_header, NLM_F_MULTI, SOCK_DIAG_BY_FAMILY};
    use crate::wire::request::AF_INET;
    use crate::wire::TailLayout;
    use xtcp_feed::datagram::{decode_datagram, Datagram};

    const SEQ: u32 = 7;

    /// A socket message of dump `SEQ`: an IPv4 `inet_diag_msg` of zeros,
    /// followed when `broken` by an attribute shorter than its own header.
    fn socket_message(broken: bool) -> Vec<u8> {
        let mut payload = vec![0u8; INET_DIAG_MSG_LEN];
        payload[0] = AF_INET;
        if broken {
            payload.extend_from_slice(&[2, 0, 2, 0]);
        }
        let mut out = [0u8; NLMSG_HDRLEN].to_vec();
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        put_header(
            out.as_mut_slice().try_into().unwrap(),
            len,
            SOCK_DIAG_BY_FAMILY,
            NLM_F_MULTI,
            SEQ,
        );
        out.extend_from_slice(&payload);
        out
    }

    /// Sockets that fail to decode take no record number: the records of
    /// two buffers, the first with a broken socket between two good ones,
    /// are numbered 1, 2, 3 (the reserved-per-socket numbering gave 1, 2, 4).
    #[test]
    fn record_numbers_have_no_gaps_where_a_socket_failed_to_decode() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let family = Family {
            af: AF_INET,
            netlinkers: 1,
            inetdiagers: 1,
        };
        let (report_tx, report_rx) = bounded(1);
        let socket = SockDiagSocket::open(Duration::from_secs(1)).unwrap();
        let dump = Arc::new(Dump::new(
            family,
            Arc::new(socket),
            SEQ,
            PollStamp::default(),
            report_tx,
        ));
        let pool = BufferPool::new(2, 4096);
        let (_abort_tx, abort) = bounded::<()>(0);
        let (tx, rx) = bounded(2);
        for broken in [&[false, true, false][..], &[false]] {
            let datagram: Vec<u8> = broken.iter().flat_map(|&b| socket_message(b)).collect();
            let mut buf = pool.get(&abort).unwrap();
            buf[..datagram.len()].copy_from_slice(&datagram);
            let dump = Arc::clone(&dump);
            let len = datagram.len();
            tx.send(vec![ReceivedDatagram { buf, len, dump }]).unwrap();
        }
        drop((tx, dump));
        let inetdiager = Inetdiager {
            capture: None,
            writer: RecordWriter::new(
                RecordEncoder::new(Identity::new("h", 9)),
                Sink::Udp(UdpSink::connect(receiver.local_addr().unwrap(), 60_000, None).unwrap()),
                Sampler::new(1),
                TailLayout::for_release("6.1.0"),
            ),
        };
        inetdiager.run(rx, &Shutdown::new().unwrap());
        let totals = report_rx.try_recv().unwrap().totals;
        assert_eq!((totals.records, totals.decode_errors), (3, 1), "{totals:?}");

        let mut numbers = Vec::new();
        let mut datagram = [0u8; 65536];
        for _ in 0..2 {
            let n = receiver.recv(&mut datagram).unwrap();
            let Datagram::Records(records) = decode_datagram(&datagram[..n]).unwrap() else {
                panic!("a watermark from an inetdiager");
            };
            for record in records {
                assert_eq!(record.instance, 9);
                numbers.push(record.record_counter);
            }
        }
        assert_eq!(numbers, [1, 2, 3]);
    }
}
