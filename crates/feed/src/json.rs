//! serde helpers wired onto the generated types by `build.rs`: addresses print
//! as IP strings and enums by name, so the JSON reads like `ss`.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serializer;

use crate::proto::{CongestionAlgorithm, ProcessOwner, RecordKind};

/// 4 bytes -> "10.0.0.1", 16 bytes -> "::1", empty -> "", anything else -> hex
/// (only a malformed record from a peer can hold another length).
pub fn ip_address<S: Serializer>(addr: &[u8], s: S) -> Result<S::Ok, S::Error> {
    if let Ok(v4) = <[u8; 4]>::try_from(addr) {
        s.collect_str(&Ipv4Addr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(addr) {
        s.collect_str(&Ipv6Addr::from(v6))
    } else {
        let hex: String = addr.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }
}

/// An enum value's proto name, or the number if it has none.
fn by_name<S: Serializer>(value: i32, name: Option<&str>, s: S) -> Result<S::Ok, S::Error> {
    match name {
        Some(name) => s.serialize_str(name),
        None => s.serialize_i32(value),
    }
}

/// `CONGESTION_ALGORITHM_BBR`.
pub fn congestion_algorithm<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    let name = CongestionAlgorithm::try_from(*value).ok();
    by_name(*value, name.map(|c| c.as_str_name()), s)
}

/// `PROCESS_OWNER_FOUND`.
pub fn process_owner<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    let name = ProcessOwner::try_from(*value).ok();
    by_name(*value, name.map(|o| o.as_str_name()), s)
}

/// `RECORD_KIND_CLOSED`.
pub fn record_kind<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    by_name(
        *value,
        RecordKind::try_from(*value).ok().map(|k| k.as_str_name()),
        s,
    )
}

#[cfg(test)]
mod tests {
    use crate::proto::{CongestionAlgorithm, Record};

    #[test]
    fn record_json_is_readable() {
        let r = Record {
            inet_diag_msg_socket_source: vec![127, 0, 0, 1],
            inet_diag_msg_socket_destination: std::net::Ipv6Addr::LOCALHOST.octets().to_vec(),
            congestion_algorithm_enum: CongestionAlgorithm::Cubic as i32,
            tcp_info_rtt: Some(1234),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["inet_diag_msg_socket_source"], "127.0.0.1");
        assert_eq!(v["inet_diag_msg_socket_destination"], "::1");
        assert_eq!(v["congestion_algorithm_enum"], "CONGESTION_ALGORITHM_CUBIC");
        assert_eq!(v["record_kind"], "RECORD_KIND_POLLED");
        assert_eq!(v["tcp_info_rtt"], 1234);
        assert!(
            v.get("tcp_info_snd_cwnd").is_none(),
            "absent optional fields are left out"
        );
        assert_eq!(v["tcp_info_len"], 0, "non-optional fields always print");
    }

    #[test]
    fn odd_address_lengths_print_as_hex() {
        let r = Record {
            inet_diag_msg_socket_source: vec![1, 0xab],
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["inet_diag_msg_socket_source"], "01ab");
        assert_eq!(v["inet_diag_msg_socket_destination"], "");
    }
}
