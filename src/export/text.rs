//! One `ss`-like line per record, for people: what `xtcp-debug-server
//! --format text` and `xtcp --dest stdout --format text` print.
//!
//! `ESTAB 10.0.0.1:443 > 10.0.0.2:5555 cubic rtt 1.2/0.6ms cwnd 10 ... rq 0
//! wq 0 cookie 0x2a poll 7`, then the record's kind unless it is a plain
//! poll's, then `netns NAME` for a socket of another namespace, then
//! `cgroup:PATH` as `ss -e` prints it and `service NAME` (pod, container
//! or unit) when the path names one, then with `--processes` `processes
//! PID/COMMAND,...` (`none` for a socket without inode, `unknown` when no
//! visible process holds it).

use std::net::SocketAddr;

use crate::attribution::service_of;
use crate::wire::state;
use xtcp_feed::proto::{ProcessOwner, Record, RecordKind};

/// `10.0.0.1:443`, `[::1]:80`; `?:PORT` for an address of another length.
pub fn endpoint(addr: &[u8], port: u32) -> String {
    let port = u16::try_from(port).unwrap_or(0);
    if let Ok(v4) = <[u8; 4]>::try_from(addr) {
        SocketAddr::from((v4, port)).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(addr) {
        SocketAddr::from((v6, port)).to_string()
    } else {
        format!("?:{port}")
    }
}

/// `ESTAB 10.0.0.1:443 > 10.0.0.2:5555 cubic rtt 1.2/0.6ms cwnd 10 ...`
pub fn text_line(r: &Record) -> String {
    let state = u8::try_from(r.inet_diag_msg_state)
        .ok()
        .and_then(state::label)
        .map_or_else(
            || format!("STATE-{}", r.inet_diag_msg_state),
            str::to_string,
        );
    let mut line = format!(
        "{state} {} > {}",
        endpoint(
            &r.inet_diag_msg_socket_source,
            r.inet_diag_msg_socket_source_port
        ),
        endpoint(
            &r.inet_diag_msg_socket_destination,
            r.inet_diag_msg_socket_destination_port
        ),
    );
    if !r.congestion_algorithm_string.is_empty() {
        line.push(' ');
        line.push_str(&r.congestion_algorithm_string);
    }
    let ms = |usec: u32| f64::from(usec) / 1000.0;
    if let (Some(rtt), Some(var)) = (r.tcp_info_rtt, r.tcp_info_rttvar) {
        line.push_str(&format!(" rtt {}/{}ms", ms(rtt), ms(var)));
    }
    let fields: [(&str, Option<u64>); 8] = [
        ("cwnd", r.tcp_info_snd_cwnd.map(u64::from)),
        ("retrans", r.tcp_info_total_retrans.map(u64::from)),
        ("unacked", r.tcp_info_unacked.map(u64::from)),
        ("bytes_acked", r.tcp_info_bytes_acked),
        ("bytes_received", r.tcp_info_bytes_received),
        ("delivery_rate", r.tcp_info_delivery_rate),
        ("rmem", r.sk_mem_info_rmem_alloc.map(u64::from)),
        ("wmem", r.sk_mem_info_wmem_alloc.map(u64::from)),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            line.push_str(&format!(" {name} {v}"));
        }
    }
    line.push_str(&format!(
        " rq {} wq {} cookie {:#x} poll {}",
        r.inet_diag_msg_rqueue, r.inet_diag_msg_wqueue, r.inet_diag_msg_socket_cookie, r.poll_id
    ));
    // A record that is not a plain poll's says what it is: closed (its state
    // is the socket's last), or snapshot, new or changed (--changes-only).
    let kind = r.record_kind();
    if kind != RecordKind::Polled {
        let name = kind.as_str_name().trim_start_matches("RECORD_KIND_");
        line.push(' ');
        line.push_str(&name.to_lowercase());
    }
    // Records of other namespaces (--netns, --all-netns) say which.
    if !r.netns_name.is_empty() {
        line.push_str(&format!(" netns {}", r.netns_name));
    }
    // Whose: the cgroup as `ss -e` prints it, and the service it names
    // when that is not the path itself.
    if !r.cgroup_path.is_empty() {
        line.push_str(&format!(" cgroup:{}", r.cgroup_path));
        let service = service_of(&r.cgroup_path, &r.systemd_unit, &r.container_id, &r.pod_uid);
        if service != r.cgroup_path {
            line.push_str(&format!(" service {service}"));
        }
    }
    // With --processes: who holds it, or why nobody is named.
    match r.process_owner() {
        ProcessOwner::Unspecified => {}
        ProcessOwner::Found => line.push_str(&format!(" processes {}", r.processes)),
        ProcessOwner::None => line.push_str(" processes none"),
        ProcessOwner::NotFound => line.push_str(" processes unknown"),
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_line_reads_like_ss() {
        let r = Record {
            inet_diag_msg_state: 1,
            inet_diag_msg_socket_source: vec![10, 0, 0, 1],
            inet_diag_msg_socket_source_port: 443,
            inet_diag_msg_socket_destination: vec![10, 0, 0, 2],
            inet_diag_msg_socket_destination_port: 5555,
            congestion_algorithm_string: "cubic".into(),
            tcp_info_rtt: Some(1200),
            tcp_info_rttvar: Some(600),
            tcp_info_snd_cwnd: Some(10),
            ..Default::default()
        };
        let line = text_line(&r);
        assert!(
            line.starts_with("ESTAB 10.0.0.1:443 > 10.0.0.2:5555 cubic rtt 1.2/0.6ms cwnd 10 rq 0"),
            "{line}"
        );
        let mut v6 = r.clone();
        v6.inet_diag_msg_state = 6;
        v6.inet_diag_msg_socket_source = std::net::Ipv6Addr::LOCALHOST.octets().to_vec();
        assert!(text_line(&v6).starts_with("TIME-WAIT [::1]:443 > 10.0.0.2:5555"));
        assert!(!line.contains("netns"));
        v6.netns_name = "blue".into();
        assert!(text_line(&v6).ends_with(" poll 0 netns blue"));
        v6.record_kind = RecordKind::Closed as i32;
        assert!(text_line(&v6).ends_with(" poll 0 closed netns blue"));
        v6.record_kind = RecordKind::Changed as i32;
        assert!(text_line(&v6).ends_with(" poll 0 changed netns blue"));
        v6.cgroup_path = "/system.slice/nginx.service".into();
        v6.systemd_unit = "nginx.service".into();
        let whose = " netns blue cgroup:/system.slice/nginx.service service nginx.service";
        assert!(text_line(&v6).ends_with(whose), "{}", text_line(&v6));
        v6.cgroup_path = "/".into();
        v6.systemd_unit.clear();
        assert!(text_line(&v6).ends_with(" netns blue cgroup:/"));
        v6.process_owner = ProcessOwner::Found as i32;
        v6.processes = "7/nginx,9/nginx".into();
        assert!(text_line(&v6).ends_with(" cgroup:/ processes 7/nginx,9/nginx"));
        v6.process_owner = ProcessOwner::None as i32;
        assert!(text_line(&v6).ends_with(" cgroup:/ processes none"));
    }
}
