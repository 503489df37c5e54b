//! `--dest udp:HOST:PORT`: protobuf records in UDP datagrams, in the
//! feed's layouts ([`xtcp_feed::datagram`]): one bare record per datagram
//! (`--udp-batch-bytes 0`) or envelopes of records up to the batch limit,
//! and a watermark after each poll and at the stop.
//!
//! Send errors (nobody listening: `ECONNREFUSED` from the ICMP error of an
//! earlier datagram) are counted with the records they carried and never stop
//! the exporter. Each inetdiager thread owns one sink.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use xtcp_feed::auth::{FeedKey, TAG_LEN};
use xtcp_feed::datagram::{framed_len, push_record, push_watermark};
use xtcp_feed::proto::Watermark;

/// What the sends since the last [`UdpSink::take_tally`] did.
#[derive(Debug, Default)]
pub struct SendTally {
    pub datagrams: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Records in the datagrams that failed.
    pub records_lost: u64,
    pub first_error: Option<io::Error>,
}

impl SendTally {
    fn sent(&mut self, result: io::Result<usize>, records: u64) {
        match result {
            Ok(n) => {
                self.datagrams += 1;
                self.bytes += n as u64;
            }
            Err(e) => {
                self.errors += 1;
                self.records_lost += records;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

pub struct UdpSink {
    socket: UdpSocket,
    /// Most bytes of records per datagram (the tag comes on top, within
    /// `--udp-batch-bytes`); 0: one bare record per datagram.
    batch_limit: usize,
    /// Signs each datagram (`--feed-key`). Boxed: the keyed hash state is
    /// larger than the rest of the sink.
    key: Option<Box<FeedKey>>,
    batch: Vec<u8>,
    batch_records: u64,
    tally: SendTally,
}

/// A UDP socket on an ephemeral port of the wildcard address of `dest`'s
/// family, so it can send to `dest`.
pub fn bind_for(dest: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match dest {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    UdpSocket::bind(any)
}

impl UdpSink {
    /// A socket connected to `dest` (so send errors come back to us),
    /// sending datagrams of at most `batch_limit` bytes, each signed with
    /// `key` if there is one.
    pub fn connect(dest: SocketAddr, batch_limit: usize, key: Option<FeedKey>) -> io::Result<Self> {
        let socket = bind_for(dest)?;
        socket.connect(dest)?;
        let tag = if key.is_some() { TAG_LEN } else { 0 };
        Ok(UdpSink {
            socket,
            batch_limit: batch_limit.saturating_sub(tag),
            key: key.map(Box::new),
            batch: Vec::with_capacity(batch_limit),
            batch_records: 0,
            tally: SendTally::default(),
        })
    }

    /// Sends `record`, or adds it to the batch (sending the batch first if
    /// the record would not fit). A record larger than the limit goes alone.
    pub fn record(&mut self, record: &[u8]) {
        if self.batch_limit == 0 {
            self.batch.extend_from_slice(record);
            self.batch_records = 1;
            self.flush();
            return;
        }
        if self.batch.len() + framed_len(record) > self.batch_limit {
            self.flush();
        }
        push_record(&mut self.batch, record);
        self.batch_records += 1;
    }

    /// Sends the pending batch, if any. Called after each netlink buffer so
    /// no record waits for the next poll.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if let Some(key) = &self.key {
            key.sign(&mut self.batch);
        }
        let result = self.socket.send(&self.batch);
        self.tally.sent(result, self.batch_records);
        self.batch.clear();
        self.batch_records = 0;
    }

    pub fn take_tally(&mut self) -> SendTally {
        std::mem::take(&mut self.tally)
    }

    /// Sends `watermark` in a datagram of its own (signed like the
    /// records), after what is pending. Its failure is the caller's to
    /// count: it is not a record.
    pub fn watermark(&mut self, watermark: &Watermark) -> io::Result<()> {
        self.flush();
        push_watermark(&mut self.batch, watermark).map_err(io::Error::other)?;
        if let Some(key) = &self.key {
            key.sign(&mut self.batch);
        }
        let sent = self.socket.send(&self.batch);
        self.batch.clear();
        sent.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use prost::Message;
    use xtcp_feed::datagram::{decode_datagram, Datagram};
    use xtcp_feed::proto::Record;

    /// Record `n` of a run, about 30 bytes.
    fn record(n: u64) -> Vec<u8> {
        let record = Record {
            hostname: "a-host-of-the-fleet".into(),
            schema_version: 1,
            record_counter: n,
            ..Default::default()
        };
        record.encode_to_vec()
    }

    fn receiver() -> UdpSocket {
        let r = UdpSocket::bind("127.0.0.1:0").unwrap();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r
    }

    fn receive(r: &UdpSocket, datagrams: usize) -> Vec<Datagram<Vec<Record>>> {
        let mut buf = vec![0; 65536];
        (0..datagrams)
            .map(|_| {
                let n = r.recv(&mut buf).unwrap();
                decode_datagram(&buf[..n]).unwrap()
            })
            .collect()
    }

    fn counters(datagrams: &[Datagram<Vec<Record>>]) -> Vec<u64> {
        datagrams
            .iter()
            .flat_map(|d| match d {
                Datagram::Records(records) => records.iter().map(|r| r.record_counter).collect(),
                Datagram::Watermark(_) => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn one_record_per_datagram() {
        let r = receiver();
        let mut sink = UdpSink::connect(r.local_addr().unwrap(), 0, None).unwrap();
        for n in 1..=3 {
            sink.record(&record(n));
        }
        assert_eq!(counters(&receive(&r, 3)), [1, 2, 3]);
        let tally = sink.take_tally();
        assert_eq!((tally.datagrams, tally.errors), (3, 0));
    }

    #[test]
    fn batches_stay_under_the_limit_and_decode_as_envelopes() {
        let r = receiver();
        let limit = 600;
        let mut sink = UdpSink::connect(r.local_addr().unwrap(), limit, None).unwrap();
        for n in 1..=40 {
            sink.record(&record(n));
        }
        sink.flush();
        let tally = sink.take_tally();
        assert!(tally.datagrams > 1);
        let got = receive(&r, tally.datagrams as usize);
        assert_eq!(counters(&got), (1..=40).collect::<Vec<_>>());
        assert!(tally.bytes <= tally.datagrams * limit as u64);
        // Nothing pending: a second flush sends nothing.
        sink.flush();
        assert_eq!(sink.take_tally().datagrams, 0);
    }

    #[test]
    fn nobody_listening_is_counted_not_fatal() {
        let port = receiver().local_addr().unwrap(); // bound, then closed
        let mut sink = UdpSink::connect(port, 0, None).unwrap();
        for n in 1..=20 {
            sink.record(&record(n));
            std::thread::sleep(Duration::from_millis(1));
        }
        let tally = sink.take_tally();
        assert_eq!(tally.datagrams + tally.errors, 20);
        assert!(tally.errors > 0, "{tally:?}");
        assert_eq!(tally.records_lost, tally.errors);
        assert_eq!(
            tally.first_error.unwrap().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }

    #[test]
    fn a_watermark_goes_alone_and_signed() {
        let r = receiver();
        let key = FeedKey::new(&[7; 32]).unwrap();
        let addr = r.local_addr().unwrap();
        let mut sink = UdpSink::connect(addr, 60_000, Some(key.clone())).unwrap();
        sink.record(&record(1));
        let mark = Watermark {
            schema_version: 4,
            hostname: "h".into(),
            instance: 3,
            poll_id: 1,
            record_counter: 1,
            stopped: false,
            poll_interval_ms: 30_000,
        };
        sink.watermark(&mark).unwrap();
        let mut buf = vec![0; 65536];
        let mut got = Vec::new();
        for _ in 0..2 {
            let n = r.recv(&mut buf).unwrap();
            let payload = &buf[..n - TAG_LEN];
            let mut signed = payload.to_vec();
            key.sign(&mut signed);
            assert_eq!(signed, &buf[..n], "signed");
            got.push(decode_datagram(payload).unwrap());
        }
        assert!(matches!(&got[0], Datagram::Records(r) if r.len() == 1));
        assert_eq!(got[1], Datagram::Watermark(mark));
    }
}
