//! `--dest udp:HOST:PORT`: protobuf records in UDP datagrams.
//!
//! Three datagram layouts, told apart by their first byte:
//! - one bare `xtcp.v1.Record` (`--udp-batch-bytes 0`); a record always starts
//!   with field 1 `schema_version` as a varint, key byte `0x08`;
//! - a batch: an `xtcp.v1.Envelope`, i.e. records each written as key `0x0A`
//!   (field 1, length-delimited), a varint length and the record bytes,
//!   packed up to the batch limit. Any protobuf library reads it as one
//!   `Envelope`; ClickHouse reads it as `ProtobufList`;
//! - a watermark: an `Envelope` holding only its field 2, a `Watermark`
//!   (key `0x12`), which the poller sends after each poll and at the stop
//!   so receivers can count a lost tail (`export::sequence`).
//!
//! Send errors (nobody listening: `ECONNREFUSED` from the ICMP error of an
//! earlier datagram) are counted with the records they carried and never stop
//! the exporter. Each inetdiager thread owns one sink.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{setsockopt, sockopt};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;
use socket2::{Domain, Protocol, Socket, Type};

use crate::export::auth::{FeedKey, TAG_LEN};
use crate::export::check::check_record;
use crate::export::sequence::RecordId;
use crate::proto::{Envelope, Record, Watermark};
use crate::wire::inet_diag::SkMemInfo;

/// First byte of a batch datagram: `Envelope.records` (1) length-delimited.
const ENVELOPE_KEY: u8 = 0x0a;
/// First byte of a watermark datagram: `Envelope.watermark` (2).
const WATERMARK_KEY: u8 = 0x12;

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

/// A UDP socket bound to `listen` for receiving the records of exporters,
/// with `recv_buffer` bytes of receive buffer asked for: a poll arrives as a
/// burst, and a small buffer drops datagrams. `SO_RCVBUFFORCE` (needs
/// `CAP_NET_ADMIN`) ignores `net.core.rmem_max`; without it `SO_RCVBUF` is
/// capped there, and a warning prefixed with `program` says so.
pub fn bind_receiver(
    listen: SocketAddr,
    recv_buffer: usize,
    program: &str,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM, // socket2 sets SOCK_CLOEXEC
        Some(Protocol::UDP),
    )?;
    let wanted = recv_buffer.min(i32::MAX as usize / 2);
    if setsockopt(&socket, sockopt::RcvBufForce, &wanted).is_err() {
        socket.set_recv_buffer_size(wanted)?;
    }
    socket.bind(&listen.into())?;
    let socket = UdpSocket::from(socket);
    let granted = recv_buffer_len(&socket)?;
    if granted < wanted {
        crate::say!(
            "{program}: warning: UDP receive buffer is {granted} bytes, not the {wanted} asked \
             for (net.core.rmem_max; CAP_NET_ADMIN lifts it): bursts may be dropped"
        );
    }
    Ok(socket)
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
    Ok(SkMemInfo::new(&meminfo[..len]).drops())
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
        let framed = 1 + encoded_len_varint(record.len() as u64) + record.len();
        if self.batch.len() + framed > self.batch_limit {
            self.flush();
        }
        encode_key(1, WireType::LengthDelimited, &mut self.batch);
        encode_varint(record.len() as u64, &mut self.batch);
        self.batch.extend_from_slice(record);
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
        let envelope = Envelope {
            records: Vec::new(),
            watermark: Some(watermark.clone()),
        };
        envelope.encode(&mut self.batch).map_err(io::Error::other)?;
        if let Some(key) = &self.key {
            key.sign(&mut self.batch);
        }
        let sent = self.socket.send(&self.batch);
        self.batch.clear();
        sent.map(drop)
    }
}

/// What one datagram of the feed carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Datagram<R> {
    /// Records: one bare record, or an envelope of them (`R` is the records
    /// or how many).
    Records(R),
    /// A run's watermark, alone in its datagram (an envelope's field 2).
    Watermark(Watermark),
}

/// Why a received datagram could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    #[error("empty datagram")]
    Empty,
    #[error("not an xtcp Envelope ({len} bytes): bad framing at byte {offset}")]
    Framing { len: usize, offset: usize },
    #[error("record {index} of {len} bytes does not decode as an xtcp Record: {why}")]
    Undecodable { index: u64, len: usize, why: String },
    #[error("record {index} has no schema_version: not an xtcp record")]
    NoSchema { index: u64 },
    #[error("not an xtcp watermark: {why}")]
    Watermark { why: String },
}

/// Every [`DatagramError::reason`], for metric labels.
pub const DATAGRAM_ERROR_REASONS: [&str; 5] =
    ["empty", "framing", "undecodable", "no_schema", "watermark"];

impl DatagramError {
    /// A short name of what was wrong, for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            DatagramError::Empty => "empty",
            DatagramError::Framing { .. } => "framing",
            DatagramError::Undecodable { .. } => "undecodable",
            DatagramError::NoSchema { .. } => "no_schema",
            DatagramError::Watermark { .. } => "watermark",
        }
    }
}

/// Why record `index` of a datagram, `bytes`, does not decode.
fn undecodable<E: std::fmt::Display>(bytes: &[u8], index: u64) -> impl FnOnce(E) -> DatagramError {
    let len = bytes.len();
    move |why| DatagramError::Undecodable {
        index,
        len,
        why: why.to_string(),
    }
}

/// Every exporter sets `schema_version`: a record without it is nobody's.
fn has_schema(schema_version: u32, index: u64) -> Result<(), DatagramError> {
    match schema_version {
        0 => Err(DatagramError::NoSchema { index }),
        _ => Ok(()),
    }
}

/// Record `index` of a datagram (0 for a bare one), decoded with prost and
/// checked as what an exporter writes: it decodes, and carries the
/// `schema_version` every exporter sets (protobuf decodes any bytes of valid
/// wire format, even none, into some `Record`).
fn decode_record(bytes: &[u8], index: u64) -> Result<Record, DatagramError> {
    let record = Record::decode(bytes).map_err(undecodable(bytes, index))?;
    has_schema(record.schema_version, index)?;
    Ok(record)
}

/// [`decode_record`]'s check without building the record
/// ([`check_record`]): the run and number it carries.
fn check_one(bytes: &[u8], index: u64) -> Result<RecordId, DatagramError> {
    let checked = check_record(bytes).map_err(undecodable(bytes, index))?;
    has_schema(checked.schema_version, index)?;
    Ok(RecordId {
        instance: checked.instance,
        poll_id: checked.poll_id,
        record_counter: checked.record_counter,
    })
}

/// A watermark datagram's watermark: an `Envelope` holding a `Watermark`
/// with a schema and a run, and no record.
fn read_watermark(datagram: &[u8]) -> Result<Watermark, DatagramError> {
    let bad = |why: &str| DatagramError::Watermark { why: why.into() };
    let envelope = Envelope::decode(datagram).map_err(|e| bad(&e.to_string()))?;
    match envelope.watermark {
        _ if !envelope.records.is_empty() => Err(bad("records beside it")),
        Some(w) if w.schema_version == 0 => Err(bad("no schema_version")),
        Some(w) if w.instance == 0 => Err(bad("no instance")),
        Some(w) => Ok(w),
        None => Err(bad("empty")),
    }
}

/// Every record of one datagram, in either layout, decoded with prost and
/// checked; or its watermark. What a reader that shows the records does.
pub fn decode_datagram(datagram: &[u8]) -> Result<Datagram<Vec<Record>>, DatagramError> {
    match datagram.first() {
        None => Err(DatagramError::Empty),
        Some(&WATERMARK_KEY) => read_watermark(datagram).map(Datagram::Watermark),
        Some(&ENVELOPE_KEY) => envelope_entries(datagram)
            .zip(0..)
            .map(|(entry, index)| decode_record(entry?.1, index))
            .collect::<Result<_, _>>()
            .map(Datagram::Records),
        Some(_) => decode_record(datagram, 0).map(|r| Datagram::Records(vec![r])),
    }
}

/// Checks every record of one datagram without building it (the same
/// verdict as [`decode_datagram`], which the `datagram` fuzz target checks)
/// and puts each record's run and number in `ids`; returns how many records,
/// or the watermark. With `out`, the records are also written there
/// length-delimited (see [`to_delimited`]). On an error, `ids` and `out` are
/// left empty: a datagram with one bad record is refused whole.
pub fn check_datagram(
    datagram: &[u8],
    ids: &mut Vec<RecordId>,
    mut out: Option<&mut Vec<u8>>,
) -> Result<Datagram<u64>, DatagramError> {
    ids.clear();
    if let Some(out) = out.as_deref_mut() {
        out.clear();
    }
    let checked = match datagram.first() {
        None => Err(DatagramError::Empty),
        Some(&WATERMARK_KEY) => return read_watermark(datagram).map(Datagram::Watermark),
        Some(&ENVELOPE_KEY) => {
            envelope_entries(datagram)
                .zip(0..)
                .try_for_each(|(entry, index)| {
                    let (framed, record) = entry?;
                    ids.push(check_one(record, index)?);
                    if let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(framed);
                    }
                    Ok(())
                })
        }
        Some(_) => check_one(datagram, 0).map(|id| {
            ids.push(id);
            if let Some(out) = out.as_deref_mut() {
                encode_varint(datagram.len() as u64, out);
                out.extend_from_slice(datagram);
            }
        }),
    };
    match checked {
        Ok(()) => Ok(Datagram::Records(ids.len() as u64)),
        Err(e) => {
            ids.clear();
            if let Some(out) = out {
                out.clear(); // nothing of a refused datagram
            }
            Err(e)
        }
    }
}

/// One datagram's records as length-delimited records (each preceded by
/// its length as a varint: what ClickHouse's `Protobuf` format, Java's
/// `parseDelimitedFrom` and Go's `protodelim` read), written into `out`,
/// each checked first ([`check_datagram`]), so nothing that is not an
/// exporter's record is passed on. What the forwarder does with each
/// datagram.
pub fn to_delimited(
    datagram: &[u8],
    out: &mut Vec<u8>,
    ids: &mut Vec<RecordId>,
) -> Result<Datagram<u64>, DatagramError> {
    check_datagram(datagram, ids, Some(out))
}

/// The field-1 entries of an envelope: each as framed (its length varint
/// and record bytes) and the record alone; an error (then nothing more)
/// where they stop tiling it exactly.
fn envelope_entries(
    envelope: &[u8],
) -> impl Iterator<Item = Result<(&[u8], &[u8]), DatagramError>> {
    let mut rest = envelope;
    std::iter::from_fn(move || {
        let (&key, after_key) = rest.split_first()?;
        let bad = DatagramError::Framing {
            len: envelope.len(),
            offset: envelope.len() - rest.len(),
        };
        let mut body = after_key;
        let entry = (key == ENVELOPE_KEY)
            .then(|| prost::encoding::decode_varint(&mut body).ok())
            .flatten()
            .and_then(|len| usize::try_from(len).ok())
            .and_then(|len| body.get(..len))
            // The varint as written, then the record.
            .map(|record| {
                let framed = &after_key[..after_key.len() - body.len() + record.len()];
                (framed, record)
            });
        match entry {
            Some(entry) => {
                rest = &after_key[entry.0.len()..];
                Some(Ok(entry))
            }
            None => {
                rest = &[];
                Some(Err(bad))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(n: u64) -> Vec<u8> {
        Record {
            schema_version: 1,
            hostname: "h".repeat(n as usize % 50),
            record_counter: n,
            ..Default::default()
        }
        .encode_to_vec()
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

    /// Records read back from length-delimited bytes.
    fn delimited(mut bytes: &[u8]) -> Vec<Record> {
        let mut records = Vec::new();
        while !bytes.is_empty() {
            records.push(Record::decode_length_delimited(&mut bytes).unwrap());
        }
        records
    }

    #[test]
    fn datagrams_become_length_delimited_records() {
        let (a, b) = (record(1), record(2));
        let mut batch = Vec::new();
        for r in [&a, &b] {
            encode_key(1, WireType::LengthDelimited, &mut batch);
            encode_varint(r.len() as u64, &mut batch);
            batch.extend_from_slice(r);
        }
        let (mut out, mut ids) = (Vec::new(), Vec::new());
        let two = to_delimited(&batch, &mut out, &mut ids).unwrap();
        assert_eq!(two, Datagram::Records(2));
        assert_eq!(out.len(), batch.len() - 2, "only the two keys go");
        let counters: Vec<u64> = delimited(&out).iter().map(|r| r.record_counter).collect();
        assert_eq!(counters, [1, 2]);
        let numbered: Vec<u64> = ids.iter().map(|id| id.record_counter).collect();
        assert_eq!(numbered, [1, 2]);
        assert_eq!(check_datagram(&batch, &mut ids, None).unwrap(), two);
        assert_eq!(ids.len(), 2);
        let one = Datagram::Records(1);
        assert_eq!(to_delimited(&a, &mut out, &mut ids).unwrap(), one);
        assert_eq!(delimited(&out)[0].record_counter, 1);
        // Cut short, an unknown field, a length past the end, garbage.
        for bad in [
            &batch[..batch.len() - 1],
            &[0x0a, 0x01, 0x08, 0x12][..],
            &[0x0a, 0x7f, 1],
            b"\x08\xff",
        ] {
            assert!(to_delimited(bad, &mut out, &mut ids).is_err(), "{bad:?}");
            assert!(out.is_empty() && ids.is_empty(), "{bad:?}");
            assert!(check_datagram(bad, &mut ids, None).is_err(), "{bad:?}");
        }
        assert!(matches!(
            to_delimited(&[], &mut out, &mut ids),
            Err(DatagramError::Empty)
        ));
    }

    /// Bytes of valid framing or wire format that no exporter wrote are
    /// refused whole, each for its reason; nothing is written for them.
    #[test]
    fn forged_datagrams_are_refused_by_reason() {
        let real = record(7);
        let watermark = |w: Watermark, records: Vec<Record>| {
            Envelope {
                records,
                watermark: Some(w),
            }
            .encode_to_vec()
        };
        let good = Watermark {
            schema_version: 4,
            instance: 9,
            ..Default::default()
        };
        let (mut out, mut ids) = (Vec::new(), Vec::new());
        for (datagram, reason) in [
            (vec![], "empty"),
            (vec![0x0a, 0x05, 1], "framing"),
            // An envelope of one 2-byte record that is not protobuf.
            (vec![0x0a, 0x02, 0xff, 0xff], "undecodable"),
            // An envelope of one empty record: decodes, but is nobody's.
            (vec![0x0a, 0x00], "no_schema"),
            // A real record, then a bad one: the datagram is refused whole.
            (
                [&[0x0a, real.len() as u8][..], &real, &[0x0a, 0x01, 0x80]].concat(),
                "undecodable",
            ),
            // A bare record without schema_version (record_counter only).
            (vec![0x28, 0x01], "no_schema"),
            // Watermarks: cut short, without a run, with records beside.
            (vec![0x12, 0x05, 0x08], "watermark"),
            (
                watermark(
                    Watermark {
                        instance: 0,
                        ..good.clone()
                    },
                    vec![],
                ),
                "watermark",
            ),
            (
                watermark(good.clone(), vec![Record::decode(&real[..]).unwrap()]),
                "framing",
            ),
        ] {
            let err = to_delimited(&datagram, &mut out, &mut ids).unwrap_err();
            assert_eq!(err.reason(), reason, "{datagram:?}: {err}");
            assert!(out.is_empty(), "{datagram:?}");
            assert_eq!(decode_datagram(&datagram).unwrap_err().reason(), reason);
        }
        // An envelope's records field first, then its watermark: framing.
        let bytes = watermark(good.clone(), vec![]);
        assert_eq!(
            to_delimited(&bytes, &mut out, &mut ids).unwrap(),
            Datagram::Watermark(good)
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

    #[test]
    fn undecodable_datagrams_are_errors() {
        assert!(matches!(decode_datagram(&[]), Err(DatagramError::Empty)));
        assert!(decode_datagram(&[0x0a, 0x05, 1]).is_err());
        assert!(decode_datagram(b"\xff\xff\xff").is_err());
    }
}
