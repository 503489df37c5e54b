//! Decoding captured kernel bytes (`tests/fixtures/`, see its README): the
//! scenario dumps from a 6.18 kernel and the fixtures derived from them for the
//! `tcp_info` lengths of older kernels and the 7.0 layout.

use prost::Message;
use serde_json::Value;
use xtcp::export::record::{PollStamp, RecordEncoder};
use xtcp::identity::Identity;
use xtcp::wire::message::{messages, Body};
use xtcp::wire::{decode_socket, TailLayout};
use xtcp_feed::proto::Record;

const SCENARIO_V4: &[u8] = include_bytes!("../fixtures/scenario-v4.bin");
const SCENARIO_V6: &[u8] = include_bytes!("../fixtures/scenario-v6.bin");
const BENCH: &[u8] = include_bytes!("../fixtures/bench-dump.bin");

/// Every socket of a fixture as the JSON of its record; asserts the framing
/// is clean and ends with one NLMSG_DONE per dump.
fn decode(bytes: &[u8], tail: TailLayout) -> (Vec<Value>, usize) {
    let mut encoder = RecordEncoder::new(Identity::new("fixture", 1));
    let mut buf = vec![0u8; encoder.max_record_len()];
    let stamp = PollStamp {
        poll_id: 1,
        timestamp_ns: 1,
        ..Default::default()
    };
    let mut records = Vec::new();
    let mut dones = 0;
    for msg in messages(bytes) {
        let msg = msg.unwrap();
        assert!(!msg.dump_interrupted());
        match msg.body().unwrap() {
            Body::Socket(p) => {
                let s = decode_socket(p, tail).unwrap();
                let len = encoder.encode(&s, &stamp, &mut buf).unwrap();
                let record = Record::decode(&buf[..len]).unwrap();
                records.push(serde_json::to_value(record).unwrap());
            }
            Body::Done { error } => {
                assert_eq!(error, 0);
                dones += 1;
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    (records, dones)
}

fn find(records: &[Value], state: u64, sport: u64, dport: u64) -> &Value {
    records
        .iter()
        .find(|r| {
            r["inet_diag_msg_state"] == state
                && r["inet_diag_msg_socket_source_port"] == sport
                && r["inet_diag_msg_socket_destination_port"] == dport
        })
        .unwrap_or_else(|| panic!("no socket state {state} {sport} -> {dport}"))
}

/// The scenario of crates/testkit/src/lib.rs: listener 40001, clients base+1..3
/// established (plain, cubic, TOS 0x28) with 3000 bytes up and 1000 down,
/// client base+4 in TIME_WAIT. Default congestion control was bbr.
fn check_scenario(bytes: &[u8], family: u64, base: u64, tos_field: &str) {
    let (records, dones) = decode(bytes, TailLayout::U16Pair);
    assert_eq!(dones, 1);
    assert_eq!(records.len(), 8);
    assert!(records.iter().all(|r| r["inet_diag_msg_family"] == family));

    let listener = find(&records, 10, 40001, 0);
    assert_eq!(listener["congestion_algorithm_string"], "bbr");
    assert_eq!(listener["tcp_info_len"], 280);

    for (i, (cc, tos)) in [("bbr", 0), ("cubic", 0), ("bbr", 0x28)]
        .into_iter()
        .enumerate()
    {
        let port = base + 1 + i as u64;
        let client = find(&records, 1, port, 40001);
        let server = find(&records, 1, 40001, port);
        assert_eq!(client["tcp_info_bytes_sent"], 3000);
        assert_eq!(client["tcp_info_bytes_received"], 1000);
        // bytes_acked counts the SYN on the active side.
        assert_eq!(client["tcp_info_bytes_acked"], 3001);
        assert_eq!(server["tcp_info_bytes_sent"], 1000);
        assert_eq!(server["tcp_info_bytes_received"], 3000);
        assert_eq!(client["congestion_algorithm_string"], cc);
        assert_eq!(client[tos_field], tos);
        assert_eq!(server[tos_field], 0);
        for r in [client, server] {
            assert_eq!(r["tcp_info_len"], 280);
            assert_eq!(r["tcp_info_state"], 1);
            assert_eq!(r["tcp_info_unacked"], 0);
            assert_eq!(r["inet_diag_msg_uid"], 0);
            assert_eq!(
                r.get("bbr_info_bw").is_some(),
                r["congestion_algorithm_string"] == "bbr"
            );
            assert!(r["sk_mem_info_rcvbuf"].as_u64().unwrap() > 0);
            assert!(r["tcp_info_rtt"].as_u64().unwrap() > 0);
        }
    }
    let tw = find(&records, 6, base + 4, 40001);
    assert_eq!(tw["tcp_info_len"], 0);
    assert_eq!(
        tw["congestion_algorithm_enum"],
        "CONGESTION_ALGORITHM_UNSPECIFIED"
    );
    assert!(tw.get("tcp_info_rtt").is_none());
    assert!(tw.get(tos_field).is_none());
}

#[test]
fn scenario_ipv4_capture() {
    check_scenario(SCENARIO_V4, 2, 41000, "type_of_service");
    let (records, _) = decode(SCENARIO_V4, TailLayout::U16Pair);
    assert_eq!(
        find(&records, 1, 41001, 40001)["inet_diag_msg_socket_source"],
        "127.0.0.1"
    );
}

#[test]
fn scenario_ipv6_capture() {
    check_scenario(SCENARIO_V6, 10, 42000, "traffic_class");
    let (records, _) = decode(SCENARIO_V6, TailLayout::U16Pair);
    assert_eq!(
        find(&records, 1, 42001, 40001)["inet_diag_msg_socket_destination"],
        "::1"
    );
    assert_eq!(find(&records, 10, 40001, 0)["skv6only"], true);
}

#[test]
fn bench_capture_decodes_cleanly() {
    let (records, dones) = decode(BENCH, TailLayout::U16Pair);
    assert_eq!(dones, 2, "one IPv4 and one IPv6 dump");
    // 128 pairs per family plus the 8 scenario sockets per family.
    assert_eq!(records.len(), 2 * (256 + 8));
}

fn tcp_info_fields(r: &Value) -> Vec<(&String, &Value)> {
    r.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("tcp_info_") && *k != "tcp_info_len")
        .collect()
}

/// The one socket of a derived fixture, next to the socket it came from.
fn derived(bytes: &[u8], tail: TailLayout) -> (Value, Value) {
    let (records, _) = decode(bytes, tail);
    assert_eq!(records.len(), 1);
    let (source, _) = decode(SCENARIO_V4, tail);
    (records[0].clone(), find(&source, 1, 41001, 40001).clone())
}

#[test]
fn shorter_tcp_info_lengths() {
    // (fixture, length, tcp_info fields present, last present, first absent)
    let cases: [(&[u8], u64, usize, &str, &str); 5] = [
        (
            include_bytes!("../fixtures/tcp_info-104.bin"),
            104,
            34,
            "total_retrans",
            "pacing_rate",
        ),
        (
            include_bytes!("../fixtures/tcp_info-144.bin"),
            144,
            40,
            "segs_in",
            "notsent_bytes",
        ),
        (
            include_bytes!("../fixtures/tcp_info-192.bin"),
            192,
            48,
            "sndbuf_limited",
            "delivered",
        ),
        (
            include_bytes!("../fixtures/tcp_info-232.bin"),
            232,
            56,
            "snd_wnd",
            "rcv_wnd",
        ),
        (
            include_bytes!("../fixtures/tcp_info-248.bin"),
            248,
            61,
            "total_rto_time",
            "received_ce",
        ),
    ];
    for (bytes, len, present, last, first_absent) in cases {
        let (short, full) = derived(bytes, TailLayout::U16Pair);
        assert_eq!(short["tcp_info_len"], len);
        let fields = tcp_info_fields(&short);
        assert_eq!(fields.len(), present, "{len}: {fields:?}");
        for (k, v) in fields {
            assert_eq!(&full[k], v, "{len}: {k} differs from the 280-byte original");
        }
        assert!(
            short.get(format!("tcp_info_{last}")).is_some(),
            "{len}: {last}"
        );
        assert!(
            short.get(format!("tcp_info_{first_absent}")).is_none(),
            "{len}: {first_absent}"
        );
        // Everything outside tcp_info is untouched.
        assert_eq!(
            short["tcp_info_bytes_received"].as_u64().is_some(),
            len >= 136
        );
        assert_eq!(short["congestion_algorithm_string"], "bbr");
        assert_eq!(short["inet_diag_msg_socket_source_port"], 41001);
    }
}

#[test]
fn full_length_6_18_layout() {
    let (records, _) = decode(SCENARIO_V4, TailLayout::U16Pair);
    let r = find(&records, 1, 41001, 40001);
    assert_eq!(tcp_info_fields(r).len(), 70);
    // No AccECN on loopback by default: the fields are present and zero.
    assert_eq!(r["tcp_info_accecn_fail_mode"], 0);
    assert_eq!(r["tcp_info_received_ce_bytes"], 0);
    assert!(r.get("tcp_info_ecn_mode").is_none());
}

#[test]
fn linux_7_0_tail_bitfield() {
    let bytes = include_bytes!("../fixtures/tcp_info-280-v7.bin");
    let (r, full) = derived(bytes, TailLayout::Bitfield);
    assert_eq!(r["tcp_info_len"], 280);
    assert_eq!(r["tcp_info_ecn_mode"], 1);
    assert_eq!(r["tcp_info_accecn_opt_seen"], 2);
    assert_eq!(r["tcp_info_accecn_fail_mode"], 5);
    assert_eq!(r["tcp_info_options2"], 0x123);
    assert_eq!(tcp_info_fields(&r).len(), 72);
    assert_eq!(r["tcp_info_bytes_sent"], full["tcp_info_bytes_sent"]);
    // The same bytes read with the 6.x layout are two u16s and no 7.0 fields.
    let (old, _) = derived(bytes, TailLayout::U16Pair);
    assert_eq!(old["tcp_info_accecn_fail_mode"], 0x2359);
    assert_eq!(old["tcp_info_accecn_opt_seen"], 1); // 0x00012359 >> 16
    assert!(old.get("tcp_info_options2").is_none());
}
