//! Generates the protobuf record types from `proto/xtcp.proto` with prost-build.
//!
//! protoc comes from the `protoc-bin-vendored` crate so a fresh machine needs no
//! system protoc. The generated types also derive `serde::Serialize` for the
//! JSON output (`--dest stdout`, the debug server); which fields get which serde
//! attribute is read from the compiled descriptor set, so it follows the .proto
//! (each enum needs a serializer of its name in `src/json.rs`).
//!
//! It also writes `record_keys.rs`, the protobuf key of every `Record` field,
//! so the exporter can encode a decoded socket straight into a buffer without
//! filling a `Record` first: prost's generic encoder spent ~80% of
//! decode+marshal in per-field calls (`perf record` on `benches/decode.rs`);
//! and `pub mod fields`, how each field number is read, so a receiver can
//! check a record by walking its bytes without building it.

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::DescriptorProto;

const PROTO: &str = "../../proto/xtcp.proto";

/// Fields holding a network-order IPv4/IPv6 address, printed as readable IP strings.
const ADDRESS_FIELDS: [&str; 2] = [
    "inet_diag_msg_socket_source",
    "inet_diag_msg_socket_destination",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let fds = config.load_fds(&[PROTO], &["../../proto"])?;

    config.message_attribute(".xtcp.v1", "#[derive(serde::Serialize)]");
    for file in &fds.file {
        for message in &file.message_type {
            for field in &message.field {
                let path = format!(".{}.{}.{}", file.package(), message.name(), field.name());
                // proto3 `optional`: absent means "the kernel did not send it", so
                // JSON leaves the key out rather than printing null or zero.
                if field.proto3_optional() {
                    config.field_attribute(
                        &path,
                        r#"#[serde(skip_serializing_if = "Option::is_none")]"#,
                    );
                }
                if ADDRESS_FIELDS.contains(&field.name()) {
                    config.field_attribute(
                        &path,
                        r#"#[serde(serialize_with = "crate::json::ip_address")]"#,
                    );
                }
                // Enums print by name: `CongestionAlgorithm` through
                // `crate::json::congestion_algorithm`, and so on.
                if field.r#type() == Type::Enum {
                    let name = field.type_name().rsplit('.').next().unwrap_or_default();
                    config.field_attribute(
                        &path,
                        format!(
                            r#"#[serde(serialize_with = "crate::json::{}")]"#,
                            snake_case(name)
                        ),
                    );
                }
            }
        }
    }
    let record = fds
        .file
        .iter()
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "Record")
        .ok_or("proto/xtcp.proto has no message Record")?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("record_keys.rs");
    std::fs::write(out, record_keys(record)? + &record_fields(record))?;
    config.compile_fds(fds)?;
    Ok(())
}

/// `CongestionAlgorithm` -> `congestion_algorithm`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The protobuf key (field number and wire type) as varint bytes.
fn key_bytes(number: i32, wire_type: u32) -> Vec<u8> {
    let mut v = ((number as u64) << 3) | u64::from(wire_type);
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

/// Generates `pub mod key`: for each `Record` field, its protobuf key
/// (field number and wire type) as varint bytes, named after the field in
/// upper case, plus `MAX_SCALAR_LEN`, the most bytes all scalar fields
/// together can take. the exporter's `src/export/record.rs` writes records with these.
fn record_keys(msg: &DescriptorProto) -> Result<String, Box<dyn Error>> {
    let mut consts = String::new();
    let mut scalar_max = 0usize;
    for f in &msg.field {
        let name = f.name();
        if f.label() == Label::Repeated {
            return Err(format!("Record.{name}: repeated fields need support in build.rs").into());
        }
        let wire = match f.r#type() {
            Type::Uint32 | Type::Uint64 | Type::Bool | Type::Enum => 0,
            Type::String | Type::Bytes => 2,
            other => {
                return Err(
                    format!("Record.{name}: type {other:?} needs support in build.rs").into(),
                )
            }
        };
        let key = key_bytes(f.number(), wire);
        if key.len() > 2 {
            return Err(
                format!("Record.{name}: field numbers >= 2048 need support in build.rs").into(),
            );
        }
        if wire == 0 {
            scalar_max += key.len() + 10;
        }
        let bytes = key
            .iter()
            .map(|b| format!("{b:#04x}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            consts,
            "    /// `{name} = {}`\n    pub const {}: [u8; {}] = [{bytes}];",
            f.number(),
            name.to_uppercase(),
            key.len()
        );
    }
    Ok(format!(
        "/// Protobuf keys of the `Record` fields (generated by build.rs from proto/xtcp.proto).
pub mod key {{
    /// The most bytes every scalar (varint) field of a record can take together.
    pub const MAX_SCALAR_LEN: usize = {scalar_max};
{consts}}}
"
    ))
}

/// Generates `pub mod fields`: `KINDS[n]`, how field number `n` of `Record`
/// is read (`UNKNOWN`, `VARINT`, `BYTES` or `STRING`, which must be UTF-8);
/// `src/check.rs` walks received records with it.
fn record_fields(msg: &DescriptorProto) -> String {
    let top = msg.field.iter().map(|f| f.number()).max().unwrap_or(0) as usize;
    let mut kinds = vec!["UNKNOWN"; top + 1];
    for f in &msg.field {
        // record_keys refused every other type.
        kinds[f.number() as usize] = match f.r#type() {
            Type::String => "STRING",
            Type::Bytes => "BYTES",
            _ => "VARINT",
        };
    }
    format!(
        "/// How each field number of `Record` is read (generated by build.rs from proto/xtcp.proto).
pub mod fields {{
    pub const UNKNOWN: u8 = 0;
    pub const VARINT: u8 = 1;
    pub const BYTES: u8 = 2;
    /// Length-delimited, and UTF-8.
    pub const STRING: u8 = 3;
    /// By field number; numbers past the end are unknown.
    pub const KINDS: [u8; {}] = [{}];
}}
",
        top + 1,
        kinds.join(", ")
    )
}
