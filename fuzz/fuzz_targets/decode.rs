//! Property: for any bytes a netlink socket could hand us, the exporter's
//! per-buffer work (framing, socket decode under both tcp_info layouts,
//! record encoding) never panics, and every record it encodes decodes back
//! with prost and re-encodes to the same bytes.
//!
//! Run: `make fuzz` (cargo +stable fuzz needs RUSTC_BOOTSTRAP=1 here).
//! Seeds: `tests/fixtures/*.bin`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use xtcp::identity::Identity;
use xtcp::export::record::{PollStamp, RecordEncoder, MAX_NETNS_NAME_LEN};
use xtcp_feed::proto::{Record, RecordKind};
use xtcp::wire::message::{messages, Body};
use xtcp::wire::{decode_socket, TailLayout};

fuzz_target!(|data: &[u8]| {
    let mut encoder = RecordEncoder::new(Identity::new("fuzz", u64::MAX));
    let mut buf = vec![0u8; encoder.max_record_len()];
    let stamp = PollStamp {
        poll_id: u64::MAX,
        timestamp_ns: u64::MAX,
        netns_inode: u64::MAX,
        netns_name: "n".repeat(MAX_NETNS_NAME_LEN).into(),
        kind: RecordKind::Closed,
    };
    for msg in messages(data) {
        let Ok(msg) = msg else { break };
        let Ok(Body::Socket(payload)) = msg.body() else { continue };
        for tail in [TailLayout::U16Pair, TailLayout::Bitfield] {
            let Ok(socket) = decode_socket(payload, tail) else { continue };
            let len = encoder
                .encode(&socket, &stamp, &mut buf)
                .expect("max_record_len always fits one record");
            let record = Record::decode(&buf[..len]).expect("encoded records decode");
            assert_eq!(record.encode_to_vec(), &buf[..len], "canonical encoding");
        }
    }
});
