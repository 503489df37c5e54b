//! `RecordEncoder` writes `Record`s straight from decoded sockets. Its bytes
//! must decode with prost to the record they describe and be canonical:
//! exactly what prost itself encodes for that record.

use prost::Message;
use xtcp::export::record::{PollStamp, RecordEncoder, MAX_NETNS_NAME_LEN};
use xtcp::identity::Identity;
use xtcp::wire::message::{messages, Body};
use xtcp::wire::{decode_socket, TailLayout};
use xtcp_feed::proto::{Record, RecordKind};

/// A namespace name of the longest length the exporter accepts, so the
/// synthetic record below tests `max_record_len` at its bound.
fn stamp() -> PollStamp {
    PollStamp {
        poll_id: 7,
        timestamp_ns: 1_795_000_000_123_456_789,
        netns_inode: u64::MAX,
        netns_name: "n".repeat(MAX_NETNS_NAME_LEN).into(),
        kind: RecordKind::Closed,
    }
}

fn encode(enc: &mut RecordEncoder, payload: &[u8]) -> Vec<u8> {
    let s = decode_socket(payload, TailLayout::U16Pair).unwrap();
    let mut buf = vec![0u8; enc.max_record_len()];
    let n = enc
        .encode(&s, &stamp(), &mut buf)
        .expect("max_record_len is enough");
    buf.truncate(n);
    buf
}

#[test]
fn canonical_on_captured_sockets() {
    let dump = include_bytes!("../fixtures/bench-dump.bin");
    let mut enc = RecordEncoder::new(Identity::new("host.example", 42));
    let mut checked = 0;
    for msg in messages(dump) {
        if let Body::Socket(p) = msg.unwrap().body().unwrap() {
            let bytes = encode(&mut enc, p);
            let r = Record::decode(bytes.as_slice()).unwrap();
            assert_eq!(
                r.encode_to_vec(),
                bytes,
                "field order and presence as prost"
            );
            assert_eq!(r.hostname, "host.example");
            assert_eq!((r.poll_id, r.poll_timestamp_ns), (7, stamp().timestamp_ns));
            assert_eq!((r.netns_inode, r.netns_name.len()), (u64::MAX, 255));
            checked += 1;
            assert_eq!(r.record_counter, checked);
        }
    }
    assert_eq!(checked, 528);
    assert_eq!(enc.last_number(), 528);
}

/// A socket message carrying VEGAS and DCTCP info (not available on the
/// capture machine) and values at their type's maximum.
fn synthetic() -> Vec<u8> {
    let mut p = vec![0u8; 72];
    p[0] = 10; // AF_INET6
    p[1] = 1;
    p[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
    p[44..52].copy_from_slice(&[0xff; 8]); // id.idiag_cookie[2]
    let mut attr = |kind: u16, value: &[u8]| {
        p.extend(((value.len() + 4) as u16).to_ne_bytes());
        p.extend(kind.to_ne_bytes());
        p.extend(value);
        p.resize(p.len().next_multiple_of(4), 0);
    };
    let mut vegas = Vec::new();
    for v in [1u32, 2, 3, u32::MAX] {
        vegas.extend(v.to_ne_bytes());
    }
    attr(3, &vegas);
    attr(4, b"dctcp\0");
    let mut dctcp = Vec::new();
    dctcp.extend(1u16.to_ne_bytes());
    dctcp.extend(0u16.to_ne_bytes());
    for v in [1024u32, 5, u32::MAX] {
        dctcp.extend(v.to_ne_bytes());
    }
    attr(9, &dctcp);
    attr(2, &[0xff; 280]); // tcp_info with every field at its maximum
    attr(21, &u64::MAX.to_ne_bytes());
    p
}

#[test]
fn canonical_on_synthetic_extremes() {
    let mut enc = RecordEncoder::new(Identity::new("h".repeat(255), u64::MAX));
    let bytes = encode(&mut enc, &synthetic());
    let r = Record::decode(bytes.as_slice()).unwrap();
    assert_eq!(r.encode_to_vec(), bytes);
    assert_eq!(r.vegas_info_min_rtt, Some(u32::MAX));
    assert_eq!(r.dctcp_info_enabled, Some(1));
    assert_eq!(r.dctcp_info_ce_state, Some(0), "present zero survives");
    assert_eq!(r.dctcp_info_alpha, Some(1024));
    assert_eq!(r.congestion_algorithm_string, "dctcp");
    assert_eq!(r.tcp_info_bytes_acked, Some(u64::MAX));
    assert_eq!(r.tcp_info_snd_wscale, Some(15));
    assert_eq!(r.cgroup_id, Some(u64::MAX));
    assert_eq!(r.inet_diag_msg_socket_cookie, u64::MAX);
    assert_eq!(r.inet_diag_msg_socket_source_port, 65535);
    assert!(bytes.len() <= enc.max_record_len());
}

#[test]
fn short_buffer_is_none_and_not_counted() {
    let mut enc = RecordEncoder::new(Identity::new("host", 1));
    let payload = synthetic();
    let s = decode_socket(&payload, TailLayout::U16Pair).unwrap();
    let need = encode(&mut RecordEncoder::new(Identity::new("host", 1)), &payload).len();
    for len in [0, 1, need / 2, need - 1] {
        assert_eq!(enc.encode(&s, &stamp(), &mut vec![0u8; len]), None, "{len}");
    }
    assert_eq!(enc.last_number(), 0);
    assert!(enc
        .encode(&s, &stamp(), &mut vec![0u8; need + 12])
        .is_some());
}

/// docs/record.md must document every field of proto/xtcp.proto, with its number.
#[test]
fn record_doc_lists_every_field() {
    let proto = include_str!("../../proto/xtcp.proto");
    let doc = include_str!("../../docs/record.md");
    let record =
        &proto[proto.find("message Record {").unwrap()..proto.find("message Envelope").unwrap()];
    let mut fields = 0;
    for line in record.lines().map(str::trim) {
        let Some(decl) = line.strip_suffix(';') else {
            continue;
        };
        if line.starts_with("//") || !decl.contains(" = ") {
            continue;
        }
        let (lhs, number) = decl.split_once(" = ").unwrap();
        let name = lhs.split_whitespace().last().unwrap();
        let row = format!("| {number} | `{name}` |");
        assert!(
            doc.contains(&row),
            "docs/record.md lacks the row for {name} = {number}"
        );
        fields += 1;
    }
    assert_eq!(fields, 143);
}

/// The receivers' check (`xtcp_feed::check`, a walk that builds no record)
/// against prost on real records and every one-byte change of them, and
/// every cut: it accepts exactly what prost decodes, and reads the same
/// run, poll, number and schema. (The `datagram` fuzz target does the same
/// on arbitrary bytes.)
#[test]
fn the_check_accepts_exactly_what_prost_decodes() {
    use xtcp_feed::check::check_record;
    let dump = include_bytes!("../fixtures/bench-dump.bin");
    let mut enc = RecordEncoder::new(Identity::new("host.example", u64::MAX - 1));
    let records: Vec<Vec<u8>> = messages(dump)
        .filter_map(|m| match m.unwrap().body().unwrap() {
            Body::Socket(p) => Some(encode(&mut enc, p)),
            _ => None,
        })
        // Listeners, established and TIME_WAIT sockets of both families.
        .step_by(53)
        .collect();
    assert!(records.len() >= 10);
    let same = |bytes: &[u8]| {
        let ours = check_record(bytes);
        match Record::decode(bytes) {
            Ok(r) => {
                let c = ours.unwrap_or_else(|e| panic!("refused ({e}) what prost reads"));
                let read = (c.schema_version, c.instance, c.poll_id, c.record_counter);
                assert_eq!(
                    read,
                    (r.schema_version, r.instance, r.poll_id, r.record_counter)
                );
            }
            Err(e) => assert!(ours.is_err(), "accepted what prost refuses: {e}"),
        }
    };
    let mut mutated = 0;
    for record in &records {
        for len in 0..=record.len() {
            same(&record[..len]);
        }
        for at in 0..record.len() {
            let b = record[at];
            for value in [
                0x00,
                0x01,
                0x02,
                0x07,
                0x7f,
                0x80,
                0x81,
                0xff,
                b ^ 0x80,
                b ^ 0x07,
            ] {
                let mut bytes = record.clone();
                bytes[at] = value;
                same(&bytes);
                mutated += 1;
            }
        }
    }
    assert!(mutated > 40_000, "{mutated}");
}

/// A socket in a cgroup whose path names a systemd unit of the longest
/// name, a container and a pod: the record carries them, canonically and
/// within `max_record_len`; without a view, or for an id the tree lacks, it
/// carries none.
#[test]
fn owner_fields_from_the_cgroup_tree() {
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;
    use std::time::Duration;
    use xtcp::attribution::{CgroupCache, CgroupMetrics};

    let id = "0123456789abcdef".repeat(4);
    let uid = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
    let unit = format!("{}.service", "u".repeat(255 - ".service".len()));
    let root = tempfile::tempdir().unwrap();
    let container = format!(
        "kubepods-pod{}.slice/cri-containerd-{id}.scope",
        uid.replace('-', "_")
    );
    let service = format!("system.slice/{unit}");
    for dir in [&container, &service] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    let metric = |name: &str| prometheus::IntCounter::new(name, name).unwrap();
    let gauge = |name: &str| prometheus::IntGauge::new(name, name).unwrap();
    let metrics = CgroupMetrics {
        known: gauge("k"),
        left_out: gauge("l"),
        walks: metric("w"),
        misses: metric("m"),
    };
    let cache = Arc::new(CgroupCache::new(
        root.path().into(),
        100,
        Duration::from_secs(3600),
        metrics.clone(),
    ));
    let in_cgroup = |relative: &str| {
        let mut payload = synthetic();
        let at = payload.len() - 8;
        let ino = std::fs::metadata(root.path().join(relative)).unwrap().ino();
        payload[at..].copy_from_slice(&ino.to_ne_bytes());
        payload
    };
    let mut enc =
        RecordEncoder::new(Identity::new("h".repeat(255), u64::MAX)).with_cgroups(cache.view());
    for (relative, owner) in [(&container, ["", &id, uid]), (&service, [&unit, "", ""])] {
        let bytes = encode(&mut enc, &in_cgroup(relative));
        assert!(bytes.len() <= enc.max_record_len());
        let r = Record::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            r.encode_to_vec(),
            bytes,
            "field order and presence as prost"
        );
        assert_eq!(r.cgroup_path, format!("/{relative}"));
        let got = [&r.systemd_unit, &r.container_id, &r.pod_uid].map(String::as_str);
        assert_eq!(got, owner);
    }

    // An id the tree lacks: no owner, one miss; no view: no owner.
    let unknown = encode(&mut enc, &synthetic());
    assert_eq!(Record::decode(unknown.as_slice()).unwrap().cgroup_path, "");
    assert_eq!(metrics.misses.get(), 1);
    let plain = encode(
        &mut RecordEncoder::new(Identity::new("h", 1)),
        &in_cgroup(&service),
    );
    assert_eq!(Record::decode(plain.as_slice()).unwrap().cgroup_path, "");
}
