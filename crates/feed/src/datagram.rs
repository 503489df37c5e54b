//! The datagrams of the feed, as the exporter writes them and as its
//! receivers read them. Three layouts, told apart by their first byte:
//! - one bare `xtcp.v1.Record` (the exporter's `--udp-batch-bytes 0`); a
//!   record always starts with field 1 `schema_version` as a varint, key
//!   byte `0x08`;
//! - a batch: an `xtcp.v1.Envelope`, i.e. records each written as key `0x0A`
//!   (field 1, length-delimited), a varint length and the record bytes
//!   ([`push_record`]). Any protobuf library reads it as one `Envelope`;
//!   ClickHouse reads it as `ProtobufList`;
//! - a watermark: an `Envelope` holding only its field 2, a `Watermark`
//!   (key `0x12`, [`push_watermark`]), which the exporter sends after each
//!   poll and at its stop so receivers can count a lost tail
//!   ([`crate::sequence`]).
//!
//! A signed feed carries a tag after each datagram ([`crate::auth`]); what
//! is read here is the datagram without it.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;

use crate::check::check_record;
use crate::proto::{Envelope, Record, Watermark};
use crate::sequence::RecordId;

/// First byte of a batch datagram: `Envelope.records` (1) length-delimited.
const ENVELOPE_KEY: u8 = 0x0a;
/// First byte of a watermark datagram: `Envelope.watermark` (2).
const WATERMARK_KEY: u8 = 0x12;

/// The bytes `record` takes in a batch: its key, its length and itself.
pub fn framed_len(record: &[u8]) -> usize {
    1 + encoded_len_varint(record.len() as u64) + record.len()
}

/// Appends `record` to a batch, as one entry of the envelope's field 1.
pub fn push_record(batch: &mut Vec<u8>, record: &[u8]) {
    encode_key(1, WireType::LengthDelimited, batch);
    encode_varint(record.len() as u64, batch);
    batch.extend_from_slice(record);
}

/// Appends a watermark datagram: an envelope holding only `watermark`.
pub fn push_watermark(out: &mut Vec<u8>, watermark: &Watermark) -> Result<(), prost::EncodeError> {
    let envelope = Envelope {
        records: Vec::new(),
        watermark: Some(watermark.clone()),
    };
    envelope.encode(out)
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

    fn record(n: u64) -> Vec<u8> {
        Record {
            schema_version: 1,
            hostname: "h".repeat(n as usize % 50),
            record_counter: n,
            ..Default::default()
        }
        .encode_to_vec()
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
            push_record(&mut batch, r);
        }
        assert_eq!(batch.len(), framed_len(&a) + framed_len(&b));
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
    fn undecodable_datagrams_are_errors() {
        assert!(matches!(decode_datagram(&[]), Err(DatagramError::Empty)));
        assert!(decode_datagram(&[0x0a, 0x05, 1]).is_err());
        assert!(decode_datagram(b"\xff\xff\xff").is_err());
    }
}
