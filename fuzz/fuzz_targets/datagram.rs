//! Property: for any bytes a UDP peer can send the forwarder, its check
//! (`to_delimited`, which walks each record's wire format without building
//! it) never panics and passes on exactly what a reader of the datagram
//! decodes with prost (`decode_datagram`): when it accepts a datagram of
//! records, its output is the datagram's records, each length-delimited,
//! each the `Record` that `decode_datagram` returns, with a
//! `schema_version`, and it names each record's run and number for the loss
//! tracker as the decoded record does; when it reads a watermark, it is the
//! one the reader decodes; when it refuses one, it writes nothing and
//! `decode_datagram` refuses it for the same reason.
//!
//! Run: `make fuzz FUZZ_TARGET=datagram`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use xtcp_feed::sequence::RecordId;
use xtcp_feed::datagram::{check_datagram, decode_datagram, to_delimited, Datagram};
use xtcp_feed::proto::Record;

fuzz_target!(|data: &[u8]| {
    let (mut out, mut ids) = (Vec::new(), Vec::new());
    let checked = to_delimited(data, &mut out, &mut ids);
    let mut ids_alone = Vec::new();
    let alone = check_datagram(data, &mut ids_alone, None);
    assert_eq!(
        alone.as_ref().map_err(|e| e.reason()),
        checked.as_ref().map_err(|e| e.reason())
    );
    assert_eq!(ids_alone, ids);
    match (checked, decode_datagram(data)) {
        (Ok(Datagram::Records(n)), Ok(Datagram::Records(records))) => {
            assert_eq!(records.len() as u64, n);
            let tracked: Vec<RecordId> = records.iter().map(RecordId::from).collect();
            assert_eq!(ids, tracked);
            let mut rest = out.as_slice();
            for record in &records {
                assert!(record.schema_version > 0);
                let passed = Record::decode_length_delimited(&mut rest).expect("delimited");
                assert_eq!(&passed, record);
            }
            assert!(rest.is_empty(), "nothing but the records");
        }
        (Ok(Datagram::Watermark(ours)), Ok(Datagram::Watermark(theirs))) => {
            assert_eq!(ours, theirs);
            assert!(out.is_empty() && ids.is_empty());
        }
        (Err(refused), Err(reader)) => {
            assert!(out.is_empty(), "nothing of a refused datagram");
            assert!(ids.is_empty());
            assert_eq!(reader.reason(), refused.reason());
        }
        (ours, theirs) => panic!("the check says {ours:?}, a reader {theirs:?}"),
    }
});
