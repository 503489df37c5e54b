//! Generates the protobuf record types from `proto/xtcp.proto` with prost-build.
//!
//! protoc comes from the `protoc-bin-vendored` crate so a fresh machine needs no
//! system protoc. The generated types also derive `serde::Serialize` for the
//! JSON output (`--dest stdout`, the debug server); which fields get which serde
//! attribute is read from the compiled descriptor set, so it follows the .proto.

use std::error::Error;

const PROTO: &str = "proto/xtcp.proto";

/// Fields holding a network-order IPv4/IPv6 address, printed as readable IP strings.
const ADDRESS_FIELDS: [&str; 2] = [
    "inet_diag_msg_socket_source",
    "inet_diag_msg_socket_destination",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let fds = config.load_fds(&[PROTO], &["proto"])?;

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
                        r#"#[serde(serialize_with = "crate::export::json::ip_address")]"#,
                    );
                }
                if field.type_name() == ".xtcp.v1.CongestionAlgorithm" {
                    config.field_attribute(
                        &path,
                        r#"#[serde(serialize_with = "crate::export::json::congestion_algorithm")]"#,
                    );
                }
            }
        }
    }
    config.compile_fds(fds)?;
    Ok(())
}
