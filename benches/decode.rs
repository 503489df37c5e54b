//! The decode path on a real captured dump (`tests/fixtures/bench-dump.bin`,
//! 528 IPv4 and IPv6 sockets from a 6.18 kernel, 280-byte tcp_info, all
//! attributes), side by side:
//!
//! - `xtcp_decode`: netlink framing + `decode_socket` (validated borrowed
//!   views; fields are read later, when the record is built);
//! - `xtcp_decode_marshal`: the above + reading every field and encoding the
//!   protobuf `Record` into a reused buffer (`RecordEncoder`): the exporter's
//!   per-socket work;
//! - `netlink_packet_sock_diag`: the same bytes through the
//!   netlink-packet-sock-diag crate (default features: attributes parsed into
//!   owned values, tcp_info copied as bytes);
//! - `forwarder_to_delimited`: the forwarder's per-datagram work on the
//!   records of those sockets, sent as the exporter sends them (envelopes of
//!   at most `--udp-batch-bytes`): every record checked by a walk of its
//!   wire format, then copied length-delimited into the Kafka message;
//! - `record_check`: that walk alone (`xtcp_feed::check::check_record`), record
//!   by record;
//! - `record_prost_decode`: the same records decoded with prost into a
//!   reused `Record` instead, as the forwarder checked them before.
//!
//! One iteration = the whole buffer; throughput is in sockets.
//! `make bench` runs this and prints ns/socket and ratios (tools/bench/bench_report.py).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use netlink_packet_core::NetlinkMessage;
use netlink_packet_sock_diag::SockDiagMessage;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;
use xtcp::config::DEFAULT_UDP_BATCH_BYTES;
use xtcp::export::record::{PollStamp, RecordEncoder};
use xtcp::identity::Identity;
use xtcp::wire::message::{messages, Body};
use xtcp::wire::{decode_socket, DiagSocket, TailLayout};
use xtcp_feed::check::check_record;
use xtcp_feed::datagram::to_delimited;
use xtcp_feed::proto::Record;

const DUMP: &[u8] = include_bytes!("../tests/fixtures/bench-dump.bin");
const TAIL: TailLayout = TailLayout::U16Pair;

/// Calls `f` with every socket of the buffer.
#[inline(always)]
fn for_each_socket(buf: &[u8], mut f: impl FnMut(&DiagSocket<'_>)) {
    for msg in messages(buf) {
        if let Ok(Body::Socket(payload)) = msg.and_then(|m| m.body()) {
            if let Ok(socket) = decode_socket(payload, TAIL) {
                f(&socket);
            }
        }
    }
}

fn socket_count() -> u64 {
    let mut n = 0;
    for_each_socket(DUMP, |_| n += 1);
    n
}

fn decode(c: &mut Criterion) {
    let sockets = socket_count();
    assert_eq!(sockets, 528, "bench-dump.bin changed: update the docs");
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(sockets));

    g.bench_function("xtcp_decode", |b| {
        b.iter(|| {
            for_each_socket(black_box(DUMP), |s| {
                black_box(s);
            })
        })
    });

    g.bench_function("xtcp_decode_marshal", |b| {
        let (mut encoder, stamp) = encoder();
        // A reused buffer, as the exporter has.
        let mut out = vec![0u8; encoder.max_record_len()];
        b.iter(|| {
            // Record numbers come in blocks, as the exporter reserves them
            // per netlink buffer.
            encoder.reserve(sockets);
            for_each_socket(black_box(DUMP), |s| {
                black_box(encoder.encode(s, &stamp, &mut out));
            })
        })
    });

    g.bench_function("netlink_packet_sock_diag", |b| {
        b.iter(|| {
            let mut rest = black_box(DUMP);
            while !rest.is_empty() {
                let Ok(msg) = NetlinkMessage::<SockDiagMessage>::deserialize(rest) else {
                    break;
                };
                let len = (msg.header.length as usize)
                    .next_multiple_of(4)
                    .min(rest.len());
                black_box(&msg);
                rest = &rest[len..];
            }
        })
    });
    g.bench_function("forwarder_to_delimited", |b| {
        let datagrams = envelopes();
        let mut message = Vec::with_capacity(DEFAULT_UDP_BATCH_BYTES);
        let mut ids = Vec::new();
        b.iter(|| {
            for datagram in &datagrams {
                black_box(to_delimited(black_box(datagram), &mut message, &mut ids).unwrap());
            }
        })
    });
    let records = records();
    g.bench_function("record_check", |b| {
        b.iter(|| {
            for record in &records {
                black_box(check_record(black_box(record)).unwrap());
            }
        })
    });
    g.bench_function("record_prost_decode", |b| {
        let mut decoded = Record::default();
        b.iter(|| {
            for record in &records {
                decoded.clear();
                decoded.merge(black_box(&record[..])).unwrap();
                black_box(&decoded);
            }
        })
    });
    g.finish();
}

/// The record of each socket of the dump, as the exporter encodes it.
fn records() -> Vec<Vec<u8>> {
    let (mut encoder, stamp) = encoder();
    let mut record = vec![0u8; encoder.max_record_len()];
    let mut records = Vec::new();
    for_each_socket(DUMP, |s| {
        let len = encoder.encode(s, &stamp, &mut record).unwrap();
        records.push(record[..len].to_vec());
    });
    records
}

/// The exporter's encoder and a poll's stamp, as one poll has them.
fn encoder() -> (RecordEncoder, PollStamp) {
    let stamp = PollStamp {
        poll_id: 1,
        timestamp_ns: 1_795_000_000_000_000_000,
        ..Default::default()
    };
    (
        RecordEncoder::new(Identity::new(
            "bench-host.example.com",
            0x5eed_1234_abcd_0001,
        )),
        stamp,
    )
}

/// The records of the dump in envelopes of at most the default
/// `--udp-batch-bytes`, as the exporter's UDP sink packs them.
fn envelopes() -> Vec<Vec<u8>> {
    let mut datagrams = vec![Vec::new()];
    for record in records() {
        let len = record.len();
        let framed = 1 + encoded_len_varint(len as u64) + len;
        let last = datagrams.last_mut().unwrap();
        if last.len() + framed > DEFAULT_UDP_BATCH_BYTES {
            datagrams.push(Vec::new());
        }
        let last = datagrams.last_mut().unwrap();
        encode_key(1, WireType::LengthDelimited, last);
        encode_varint(len as u64, last);
        last.extend_from_slice(&record);
    }
    datagrams
}

criterion_group!(benches, decode);
criterion_main!(benches);
