//! Property: for any bytes a UDP peer can send the forwarder, its parser
//! (`to_delimited`) never panics and passes on exactly what a reader of the
//! datagram decodes: when it accepts a datagram, its output is the
//! datagram's records, each length-delimited, each the `Record` that
//! `decode_datagram` returns, with a `schema_version`, and names each
//! record's run and number for the loss tracker; when it refuses one, it
//! writes nothing and `decode_datagram` refuses it for the same reason.
//!
//! Run: `make fuzz FUZZ_TARGET=datagram`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use xtcp::export::sequence::RecordId;
use xtcp::export::udp::{count_records, decode_datagram, to_delimited};
use xtcp::proto::Record;

fuzz_target!(|data: &[u8]| {
    let (mut out, mut ids) = (Vec::new(), Vec::new());
    match to_delimited(data, &mut out, &mut ids) {
        Ok(n) => {
            let records = decode_datagram(data).expect("a reader decodes what is passed on");
            assert_eq!(records.len() as u64, n);
            assert_eq!(count_records(data).ok(), Some(n));
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
        Err(refused) => {
            assert!(out.is_empty(), "nothing of a refused datagram");
            let reader = decode_datagram(data).expect_err("a reader refuses it too");
            assert_eq!(reader.reason(), refused.reason());
        }
    }
});
