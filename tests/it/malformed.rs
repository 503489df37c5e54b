//! Bad bytes: each malformed input is a specific error, never a panic; and
//! property tests that random or mutated buffers never panic the decoder.

use proptest::prelude::*;
use xtcp::export::record::{PollStamp, RecordEncoder, MAX_NETNS_NAME_LEN};
use xtcp::identity::Identity;
use xtcp::wire::message::{messages, Body};
use xtcp::wire::{decode_socket, TailLayout, WireError};
use xtcp_feed::proto::RecordKind;

/// Walks a buffer like the exporter does: framing, then each socket message.
fn decode_all(buf: &[u8]) -> Result<usize, WireError> {
    let mut sockets = 0;
    for msg in messages(buf) {
        if let Body::Socket(p) = msg?.body()? {
            decode_socket(p, TailLayout::U16Pair)?;
            sockets += 1;
        }
    }
    Ok(sockets)
}

/// A valid one-socket netlink message, field by field.
fn message(family: u8, attrs: &[u8], msg_len: usize) -> Vec<u8> {
    let mut m = Vec::new();
    let total = 16 + msg_len + attrs.len();
    m.extend((total as u32).to_ne_bytes()); // nlmsg_len
    m.extend(20u16.to_ne_bytes()); // nlmsg_type SOCK_DIAG_BY_FAMILY
    m.extend(2u16.to_ne_bytes()); // nlmsg_flags NLM_F_MULTI
    m.extend(1u32.to_ne_bytes()); // nlmsg_seq
    m.extend(0u32.to_ne_bytes()); // nlmsg_pid
    let mut diag = [0u8; 72];
    diag[0] = family; // idiag_family
    diag[1] = 1; // idiag_state ESTABLISHED
    diag[4..6].copy_from_slice(&443u16.to_be_bytes()); // id.idiag_sport (big-endian)
    diag[6..8].copy_from_slice(&5555u16.to_be_bytes()); // id.idiag_dport
    diag[8..12].copy_from_slice(&[10, 0, 0, 1]); // id.idiag_src[0]
    diag[24..28].copy_from_slice(&[10, 0, 0, 2]); // id.idiag_dst[0]
    m.extend(&diag[..msg_len]);
    m.extend(attrs);
    m
}

/// `rtattr` header + value, padded to 4.
fn attr(kind: u16, len: u16, value: &[u8]) -> Vec<u8> {
    let mut a = len.to_ne_bytes().to_vec();
    a.extend(kind.to_ne_bytes());
    a.extend(value);
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

#[test]
fn well_formed_message_decodes() {
    let attrs = [
        attr(4, 8, b"bbr\0"),
        attr(8, 5, &[3]),
        attr(4, 19, b"fifteen_bytes_cc"),
    ]
    .concat();
    let buf = message(2, &attrs, 72);
    assert_eq!(decode_all(&buf), Ok(1));
    let Ok(Body::Socket(p)) = messages(&buf).next().unwrap().unwrap().body() else {
        panic!()
    };
    let s = decode_socket(p, TailLayout::U16Pair).unwrap();
    assert_eq!((s.msg.source_port(), s.msg.destination_port()), (443, 5555));
    assert_eq!(s.msg.source_ip().to_string(), "10.0.0.1");
    // A later duplicate wins; a 15-byte name without NUL is the longest allowed.
    assert_eq!(
        (s.congestion, s.shutdown),
        (Some("fifteen_bytes_c"), Some(3))
    );
}

#[test]
fn malformed_inputs_are_errors() {
    let good = message(2, &attr(4, 8, b"bbr\0"), 72);
    let cases: Vec<(&str, Vec<u8>, WireError)> = vec![
        (
            "truncated netlink header",
            good[..12].to_vec(),
            WireError::TruncatedHeader { remaining: 12 },
        ),
        (
            "message length past the buffer",
            good[..good.len() - 4].to_vec(),
            WireError::MessageOverrun {
                len: good.len() as u32,
                remaining: good.len() - 4,
            },
        ),
        (
            "message length below header size",
            {
                let mut b = good.clone();
                b[..4].copy_from_slice(&4u32.to_ne_bytes());
                b
            },
            WireError::MessageTooShort { len: 4 },
        ),
        (
            "short inet_diag_msg",
            message(2, &[], 40),
            WireError::ShortInetDiagMsg { len: 40 },
        ),
        (
            "bad family",
            message(7, &[], 72),
            WireError::BadFamily { family: 7 },
        ),
        (
            "attribute longer than its message",
            message(2, &attr(4, 64, b"bbr\0"), 72),
            WireError::AttributeOverrun {
                kind: 4,
                offset: 72,
                len: 64,
                remaining: 8,
            },
        ),
        (
            "zero-length attribute",
            message(2, &attr(5, 0, &[]), 72),
            WireError::AttributeTooShort {
                kind: 5,
                offset: 72,
                len: 0,
            },
        ),
        (
            "truncated attribute header",
            message(2, &[8, 0], 72),
            WireError::TruncatedAttribute {
                offset: 72,
                remaining: 2,
            },
        ),
        (
            "meminfo shorter than its struct",
            message(2, &attr(1, 12, &[0; 8]), 72),
            WireError::ShortAttribute {
                name: "MEMINFO",
                len: 8,
                need: 16,
            },
        ),
        (
            "bbr info shorter than its struct",
            message(2, &attr(16, 20, &[0; 16]), 72),
            WireError::ShortAttribute {
                name: "BBRINFO",
                len: 16,
                need: 20,
            },
        ),
        (
            "empty mark",
            message(2, &attr(15, 4, &[]), 72),
            WireError::ShortAttribute {
                name: "MARK",
                len: 0,
                need: 4,
            },
        ),
        (
            "congestion name not UTF-8",
            message(2, &attr(4, 7, &[0xff, 0xfe, 0]), 72),
            WireError::BadCongestionName { len: 2 },
        ),
    ];
    for (what, buf, want) in cases {
        assert_eq!(decode_all(&buf), Err(want), "{what}");
        assert!(!want.to_string().is_empty());
    }
}

#[test]
fn error_messages_carry_the_numbers() {
    let e = WireError::AttributeOverrun {
        kind: 4,
        offset: 72,
        len: 64,
        remaining: 8,
    };
    assert_eq!(
        e.to_string(),
        "attribute type 4 at offset 72: length 64 overruns the 8 bytes left in the message"
    );
}

#[test]
fn unknown_attributes_are_skipped_and_counted() {
    let attrs = [
        attr(19, 8, &[1, 2, 3, 4]),
        attr(14, 4, &[]),
        attr(99, 5, &[1]),
        attr(8, 5, &[1]),
    ]
    .concat();
    let buf = message(10, &attrs, 72);
    let Ok(Body::Socket(p)) = messages(&buf).next().unwrap().unwrap().body() else {
        panic!()
    };
    let s = decode_socket(p, TailLayout::U16Pair).unwrap();
    assert_eq!(
        s.unknown_attributes, 2,
        "ULP_INFO and type 99; PAD is not counted"
    );
    assert_eq!(
        s.shutdown,
        Some(1),
        "attributes after unknown ones still decode"
    );
}

/// Attribute values: raw bytes, or printable text (valid UTF-8 names).
fn attr_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(0x20u8..0x7f, 0..2000),
    ]
}

const CAPTURED: &[u8] = include_bytes!("../fixtures/scenario-v4.bin");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_all(&buf);
        let _ = decode_socket(&buf, TailLayout::Bitfield);
    }

    #[test]
    fn mutated_capture_never_panics(
        flips in proptest::collection::vec((0..CAPTURED.len(), any::<u8>()), 1..8),
        cut in 0..CAPTURED.len(),
    ) {
        let mut buf = CAPTURED[..cut].to_vec();
        for (at, byte) in flips {
            if let Some(b) = buf.get_mut(at) {
                *b = byte;
            }
        }
        let _ = decode_all(&buf);
    }
}

proptest! {
    // Messages here run to tens of KB; fewer cases keep the suite quick.
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Well-framed messages with arbitrary attributes: whatever the decoder
    /// accepts must encode into a buffer of `max_record_len()`.
    #[test]
    fn accepted_sockets_always_fit_the_record_buffer(
        v6 in any::<bool>(),
        attrs in proptest::collection::vec((1u16..=24, attr_value()), 0..24),
    ) {
        let body: Vec<u8> = attrs
            .iter()
            .flat_map(|(kind, value)| attr(*kind, (value.len() + 4) as u16, value))
            .collect();
        let buf = message(if v6 { 10 } else { 2 }, &body, 72);
        let Ok(Body::Socket(p)) = messages(&buf).next().unwrap().unwrap().body() else {
            panic!("framing of a built message")
        };
        if let Ok(s) = decode_socket(p, TailLayout::Bitfield) {
            let mut enc = RecordEncoder::new(Identity::new("h".repeat(64), u64::MAX));
            let mut out = vec![0u8; enc.max_record_len()];
            let stamp = PollStamp {
                poll_id: u64::MAX,
                timestamp_ns: u64::MAX,
                netns_inode: u64::MAX,
                netns_name: "n".repeat(MAX_NETNS_NAME_LEN).into(),
                kind: RecordKind::Closed,
            };
            prop_assert!(enc.encode(&s, &stamp, &mut out).is_some());
        }
    }
}
