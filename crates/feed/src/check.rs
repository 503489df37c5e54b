//! Checking a received record without building it.
//!
//! A receiver must pass on only what a reader of the `Record` schema
//! decodes, but it needs just four numbers of each record: its
//! `schema_version` (every exporter sets it: any bytes of valid wire format,
//! even none, decode into some `Record`), and its run, poll and number for
//! the loss tracker. Decoding the whole `Record` with prost (about 140
//! fields into a struct, strings and bytes copied) cost the forwarder over a
//! microsecond per record; [`check_record`] walks the wire format once,
//! refusing exactly what prost refuses (the `datagram` fuzz target checks
//! that): a malformed key or varint, a known field of the wrong wire type,
//! a length past the end, a string field that is not UTF-8, an unknown
//! group that does not close or nests deeper than prost's recursion limit.
//! Unknown fields of valid wire format are skipped, as prost skips them. As
//! in prost, the last occurrence of a field wins, and a `uint32` keeps the
//! low 32 bits of its varint.

use crate::proto::fields::{BYTES, KINDS, STRING, UNKNOWN, VARINT};
use crate::proto::key;

/// Why a record does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a varint is cut short or longer than 64 bits")]
    Varint,
    #[error("a key is invalid (over 32 bits, field number 0 or wire type 6 or 7)")]
    Key,
    #[error("field {field} has wire type {wire}, not its type's")]
    WireType { field: u32, wire: u8 },
    #[error("a length runs past the end")]
    Length,
    #[error("string field {field} is not UTF-8")]
    Utf8 { field: u32 },
    #[error("a group does not close, or nests too deep")]
    Group,
}

/// What a receiver reads of a well-formed record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checked {
    pub schema_version: u32,
    pub instance: u64,
    pub poll_id: u64,
    pub record_counter: u64,
}

/// The `Record` fields a receiver reads, by number (from their one-byte
/// keys, which `build.rs` generates from `proto/xtcp.proto`).
const SCHEMA_VERSION: u32 = (key::SCHEMA_VERSION[0] >> 3) as u32;
const POLL_ID: u32 = (key::POLL_ID[0] >> 3) as u32;
const RECORD_COUNTER: u32 = (key::RECORD_COUNTER[0] >> 3) as u32;
const INSTANCE: u32 = (key::INSTANCE[0] >> 3) as u32;

/// prost's limit on nested messages and groups (`RECURSION_LIMIT`).
const RECURSION_LIMIT: u32 = 100;

const VARINT_WIRE: u8 = 0;
const FIXED64_WIRE: u8 = 1;
const LEN_WIRE: u8 = 2;
const START_GROUP_WIRE: u8 = 3;
const END_GROUP_WIRE: u8 = 4;
const FIXED32_WIRE: u8 = 5;

/// How the walk treats a key (`field << 3 | wire`), for keys of fields
/// below 256: a varint it steps over (a known varint field, or an unknown
/// field of wire type 0), a string or bytes field, or anything else, which
/// [`rare_field`] reads (unknown fields of other wire types) or refuses.
const STEP_RARE: u8 = 0;
const STEP_VARINT: u8 = 1;
const STEP_STRING: u8 = 2;
const STEP_BYTES: u8 = 3;
const STEPS: [u8; 2048] = steps();

const fn steps() -> [u8; 2048] {
    let mut steps = [STEP_RARE; 2048];
    let mut key = 8; // field 0 is refused
    while key < 2048 {
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let kind = if field < KINDS.len() {
            KINDS[field]
        } else {
            UNKNOWN
        };
        steps[key] = match (kind, wire) {
            (VARINT | UNKNOWN, VARINT_WIRE) => STEP_VARINT,
            (STRING, LEN_WIRE) => STEP_STRING,
            (BYTES, LEN_WIRE) => STEP_BYTES,
            _ => STEP_RARE,
        };
        key += 1;
    }
    steps
}

/// The varint keys whose values the walk keeps (bit `key`).
const NEEDED: u128 = 1 << (SCHEMA_VERSION << 3)
    | 1 << (POLL_ID << 3)
    | 1 << (RECORD_COUNTER << 3)
    | 1 << (INSTANCE << 3);

/// Checks that `bytes` decode as a `Record` and returns the fields a
/// receiver reads, or why they do not.
///
/// Written for speed (`record_check` in `benches/decode.rs`): a record is
/// some 125 fields, so each costs a few instructions. A key of one or two
/// bytes (every field of `Record`) is read without a loop, one table lookup
/// says how to step over its field, and the value is read only for the
/// four numbers kept, lengths and strings; the rest are stepped over, most
/// in one or two byte tests. Tried and measured slower here: finding where
/// each varint ends with one 8-byte load (the next field waits on the
/// load), and a bitmap of varint ends made first.
pub fn check_record(bytes: &[u8]) -> Result<Checked, Malformed> {
    // Plain locals, not a struct: kept in registers across the loop.
    let (mut schema_version, mut instance, mut poll_id, mut record_counter) = (0, 0, 0, 0);
    let mut at = 0;
    while let Some(&b0) = bytes.get(at) {
        let key = match bytes.get(at + 1) {
            _ if b0 < 0x80 => {
                at += 1;
                u32::from(b0)
            }
            Some(&b1) if b1 < 0x80 => {
                at += 2;
                u32::from(b0 & 0x7f) | u32::from(b1) << 7
            }
            _ => {
                let (key, next) = varint(bytes, at)?;
                at = next;
                u32::try_from(key).map_err(|_| Malformed::Key)?
            }
        };
        match STEPS.get(key as usize).copied().unwrap_or(STEP_RARE) {
            STEP_VARINT if key < 128 && NEEDED >> key & 1 != 0 => {
                let (value, next) = varint(bytes, at)?;
                match key >> 3 {
                    SCHEMA_VERSION => schema_version = value as u32,
                    POLL_ID => poll_id = value,
                    RECORD_COUNTER => record_counter = value,
                    _ => instance = value,
                }
                at = next;
            }
            STEP_VARINT => at = skip_varint(bytes, at)?,
            step @ (STEP_STRING | STEP_BYTES) => {
                let (len, start) = varint(bytes, at)?;
                let payload = payload(bytes, start, len)?;
                if step == STEP_STRING && std::str::from_utf8(payload).is_err() {
                    return Err(Malformed::Utf8 { field: key >> 3 });
                }
                at = start + payload.len();
            }
            _ => at = rare_field(bytes, at, key)?,
        }
    }
    Ok(Checked {
        schema_version,
        instance,
        poll_id,
        record_counter,
    })
}

/// A field the table does not step over, whose key ended before `at`: an
/// unknown field (skipped as prost skips it), or a wrong wire type or field
/// number (refused). Returns where the next field starts.
#[cold]
fn rare_field(bytes: &[u8], at: usize, key: u32) -> Result<usize, Malformed> {
    let (field, wire) = (key >> 3, (key & 7) as u8);
    if field == 0 || wire > FIXED32_WIRE {
        return Err(Malformed::Key);
    }
    match KINDS.get(field as usize).copied().unwrap_or(UNKNOWN) {
        UNKNOWN => skip(bytes, at, field, wire, RECURSION_LIMIT),
        _ => Err(Malformed::WireType { field, wire }),
    }
}

/// The varint at `at` and where it ends, as prost reads it: at most 10
/// bytes, the tenth at most 1 (no bits past 64).
#[inline(always)]
fn varint(bytes: &[u8], at: usize) -> Result<(u64, usize), Malformed> {
    let rest = bytes.get(at..).unwrap_or_default();
    let mut value = 0;
    for (i, &b) in rest.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            if i == 9 && b > 1 {
                return Err(Malformed::Varint);
            }
            return Ok((value, at + i + 1));
        }
    }
    Err(Malformed::Varint)
}

/// Where the varint at `at` ends: one or two bytes without a loop.
#[inline(always)]
fn skip_varint(bytes: &[u8], at: usize) -> Result<usize, Malformed> {
    match (bytes.get(at), bytes.get(at + 1)) {
        (Some(&b), _) if b < 0x80 => Ok(at + 1),
        (Some(_), Some(&b)) if b < 0x80 => Ok(at + 2),
        _ => varint(bytes, at).map(|(_, next)| next),
    }
}

/// The `len` bytes at `start`.
#[inline(always)]
fn payload(bytes: &[u8], start: usize, len: u64) -> Result<&[u8], Malformed> {
    usize::try_from(len)
        .ok()
        .and_then(|len| start.checked_add(len))
        .and_then(|end| bytes.get(start..end))
        .ok_or(Malformed::Length)
}

/// Steps over an unknown field whose key ended before `at`, as prost's
/// `skip_field` does, `depth` levels of groups still allowed; returns where
/// the next field starts.
fn skip(bytes: &[u8], at: usize, field: u32, wire: u8, depth: u32) -> Result<usize, Malformed> {
    if depth == 0 {
        return Err(Malformed::Group);
    }
    let len = match wire {
        VARINT_WIRE => return varint(bytes, at).map(|(_, next)| next),
        LEN_WIRE => {
            let (len, start) = varint(bytes, at)?;
            return payload(bytes, start, len).map(|p| start + p.len());
        }
        FIXED64_WIRE => 8,
        FIXED32_WIRE => 4,
        START_GROUP_WIRE => {
            let mut at = at;
            loop {
                let (key, next) = varint(bytes, at)?;
                let key = u32::try_from(key).map_err(|_| Malformed::Key)?;
                let (inner, inner_wire) = (key >> 3, (key & 7) as u8);
                if inner == 0 || inner_wire > FIXED32_WIRE {
                    return Err(Malformed::Key);
                }
                at = next;
                if inner_wire == END_GROUP_WIRE {
                    return if inner == field {
                        Ok(at)
                    } else {
                        Err(Malformed::Group)
                    };
                }
                at = skip(bytes, at, inner, inner_wire, depth - 1)?;
            }
        }
        _ => return Err(Malformed::Group), // an end with no start
    };
    payload(bytes, at, len).map(|p| at + p.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Record;
    use prost::Message;

    fn record() -> Record {
        Record {
            schema_version: 4,
            hostname: "host-é".into(),
            poll_id: 3,
            record_counter: 77,
            instance: u64::MAX,
            netns_name: "ns".into(),
            inet_diag_msg_socket_source: vec![127, 0, 0, 1],
            tcp_info_rtt: Some(0),
            bbr_info_bw: Some(1 << 40),
            ..Default::default()
        }
    }

    #[test]
    fn reads_what_prost_reads() {
        let bytes = record().encode_to_vec();
        let checked = check_record(&bytes).unwrap();
        assert_eq!(
            checked,
            Checked {
                schema_version: 4,
                instance: u64::MAX,
                poll_id: 3,
                record_counter: 77,
            }
        );
        // The last occurrence wins; a uint32 keeps its low 32 bits.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&[0x08, 0x85, 0x80, 0x80, 0x80, 0x10]);
        let prost = Record::decode(&twice[..]).unwrap();
        assert_eq!(prost.schema_version, 5);
        assert_eq!(check_record(&twice).unwrap().schema_version, 5);
        assert_eq!(check_record(&[]), Ok(Checked::default()));
    }

    /// Each kind of malformed input, which prost refuses too; and unknown
    /// fields of every wire type, which both skip.
    #[test]
    fn refuses_what_prost_refuses() {
        let good = record().encode_to_vec();
        let cases: [(&[u8], Option<Malformed>); 14] = [
            (&[0x08], Some(Malformed::Varint)),
            (
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
                ],
                Some(Malformed::Varint),
            ),
            (
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                None,
            ),
            (&[0x00, 0x01], Some(Malformed::Key)),
            (&[0x0e], Some(Malformed::Key)),
            (&[0x80, 0x80, 0x80, 0x80, 0x10], Some(Malformed::Key)),
            (
                &[0x0a, 0x00],
                Some(Malformed::WireType { field: 1, wire: 2 }),
            ),
            (&[0x12, 0x05, b'a'], Some(Malformed::Length)),
            (&[0x12, 0x01, 0xff], Some(Malformed::Utf8 { field: 2 })),
            // bytes may hold anything
            (&[0x82, 0x01, 0x01, 0xff], None),
            // unknown field 2000: varint, fixed64, fixed32, a group
            (
                &[
                    0x80, 0x7d, 0x01, 0x81, 0x7d, 1, 2, 3, 4, 5, 6, 7, 8, 0x85, 0x7d, 1, 2, 3, 4,
                ],
                None,
            ),
            (&[0x83, 0x7d, 0x80, 0x7d, 0x05, 0x84, 0x7d], None),
            (&[0x83, 0x7d, 0x84, 0x7e], Some(Malformed::Group)),
            (&[0x84, 0x7d], Some(Malformed::Group)),
        ];
        for (bytes, want) in cases {
            let ours = check_record(bytes).err();
            assert_eq!(ours, want, "{bytes:02x?}");
            let theirs = Record::decode(bytes);
            assert_eq!(theirs.is_err(), want.is_some(), "{bytes:02x?}: {theirs:?}");
        }
        // prost's recursion limit: 100 nested groups, not 101.
        let nested = |n: usize| [[0x83, 0x7d].repeat(n), [0x84, 0x7d].repeat(n)].concat();
        let deep = nested(101);
        assert_eq!(check_record(&deep), Err(Malformed::Group));
        assert!(Record::decode(&deep[..]).is_err());
        let ok = nested(100);
        assert!(check_record(&ok).is_ok());
        assert!(Record::decode(&ok[..]).is_ok());
        assert!(check_record(&good).is_ok());
    }
}
