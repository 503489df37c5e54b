//! Decoded socket -> protobuf [`Record`].
//!
//! [`RecordBuilder`] owns one `Record` and overwrites every field of it for
//! each socket, so after the first socket no field allocates (the address and
//! name buffers keep their capacity). Runs in whichever thread decodes.

use crate::proto::{CongestionAlgorithm, Record};
use crate::wire::DiagSocket;

/// Bumped whenever fields are added to `proto/xtcp.proto`.
pub const SCHEMA_VERSION: u32 = 1;

/// What every record of one poll shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollStamp {
    /// 1 for the first poll.
    pub poll_id: u64,
    /// Poll start, ns since the Unix epoch.
    pub timestamp_ns: u64,
}

/// Fills a reused [`Record`] from decoded sockets.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    record: Record,
    counter: u64,
}

/// Assigns `Option` fields from a view that may itself be absent:
/// `opt!(r, view, { record_field: accessor, ... })`.
macro_rules! opt {
    ($r:ident, $view:expr, { $($field:ident: $get:ident),* $(,)? }) => {
        $( $r.$field = $view.and_then(|v| v.$get()).map(Into::into); )*
    };
}

/// Same for views whose accessors always return a value.
macro_rules! opt_fixed {
    ($r:ident, $view:expr, { $($field:ident: $get:ident),* $(,)? }) => {
        $( $r.$field = $view.map(|v| v.$get().into()); )*
    };
}

impl RecordBuilder {
    pub fn new(hostname: String) -> Self {
        RecordBuilder {
            record: Record {
                schema_version: SCHEMA_VERSION,
                hostname,
                ..Default::default()
            },
            counter: 0,
        }
    }

    /// Records built so far.
    pub fn count(&self) -> u64 {
        self.counter
    }

    /// Fills the record for `s` and returns it.
    pub fn build(&mut self, s: &DiagSocket<'_>, poll: &PollStamp) -> &Record {
        self.counter += 1;
        let r = &mut self.record;
        r.poll_id = poll.poll_id;
        r.poll_timestamp_ns = poll.timestamp_ns;
        r.record_counter = self.counter;

        let m = &s.msg;
        r.inet_diag_msg_family = m.family().into();
        r.inet_diag_msg_state = m.state().into();
        r.inet_diag_msg_timer = m.timer().into();
        r.inet_diag_msg_retrans = m.retrans().into();
        r.inet_diag_msg_socket_source_port = m.source_port().into();
        r.inet_diag_msg_socket_destination_port = m.destination_port().into();
        replace(&mut r.inet_diag_msg_socket_source, m.source());
        replace(&mut r.inet_diag_msg_socket_destination, m.destination());
        r.inet_diag_msg_socket_interface = m.interface();
        r.inet_diag_msg_socket_cookie = m.cookie();
        r.inet_diag_msg_expires = m.expires();
        r.inet_diag_msg_rqueue = m.rqueue();
        r.inet_diag_msg_wqueue = m.wqueue();
        r.inet_diag_msg_uid = m.uid();
        r.inet_diag_msg_inode = m.inode();

        opt_fixed!(r, s.meminfo, {
            mem_info_rmem: rmem, mem_info_wmem: wmem, mem_info_fmem: fmem, mem_info_tmem: tmem,
        });

        let t = s.tcp_info.as_ref();
        r.tcp_info_len = t.map_or(0, |t| t.len() as u32);
        opt!(r, t, {
            tcp_info_state: state,
            tcp_info_ca_state: ca_state,
            tcp_info_retransmits: retransmits,
            tcp_info_probes: probes,
            tcp_info_backoff: backoff,
            tcp_info_options: options,
            tcp_info_snd_wscale: snd_wscale,
            tcp_info_rcv_wscale: rcv_wscale,
            tcp_info_delivery_rate_app_limited: delivery_rate_app_limited,
            tcp_info_fastopen_client_fail: fastopen_client_fail,
            tcp_info_rto: rto,
            tcp_info_ato: ato,
            tcp_info_snd_mss: snd_mss,
            tcp_info_rcv_mss: rcv_mss,
            tcp_info_unacked: unacked,
            tcp_info_sacked: sacked,
            tcp_info_lost: lost,
            tcp_info_retrans: retrans,
            tcp_info_fackets: fackets,
            tcp_info_last_data_sent: last_data_sent,
            tcp_info_last_ack_sent: last_ack_sent,
            tcp_info_last_data_recv: last_data_recv,
            tcp_info_last_ack_recv: last_ack_recv,
            tcp_info_pmtu: pmtu,
            tcp_info_rcv_ssthresh: rcv_ssthresh,
            tcp_info_rtt: rtt,
            tcp_info_rttvar: rttvar,
            tcp_info_snd_ssthresh: snd_ssthresh,
            tcp_info_snd_cwnd: snd_cwnd,
            tcp_info_advmss: advmss,
            tcp_info_reordering: reordering,
            tcp_info_rcv_rtt: rcv_rtt,
            tcp_info_rcv_space: rcv_space,
            tcp_info_total_retrans: total_retrans,
            tcp_info_pacing_rate: pacing_rate,
            tcp_info_max_pacing_rate: max_pacing_rate,
            tcp_info_bytes_acked: bytes_acked,
            tcp_info_bytes_received: bytes_received,
            tcp_info_segs_out: segs_out,
            tcp_info_segs_in: segs_in,
            tcp_info_notsent_bytes: notsent_bytes,
            tcp_info_min_rtt: min_rtt,
            tcp_info_data_segs_in: data_segs_in,
            tcp_info_data_segs_out: data_segs_out,
            tcp_info_delivery_rate: delivery_rate,
            tcp_info_busy_time: busy_time,
            tcp_info_rwnd_limited: rwnd_limited,
            tcp_info_sndbuf_limited: sndbuf_limited,
            tcp_info_delivered: delivered,
            tcp_info_delivered_ce: delivered_ce,
            tcp_info_bytes_sent: bytes_sent,
            tcp_info_bytes_retrans: bytes_retrans,
            tcp_info_dsack_dups: dsack_dups,
            tcp_info_reord_seen: reord_seen,
            tcp_info_rcv_ooopack: rcv_ooopack,
            tcp_info_snd_wnd: snd_wnd,
            tcp_info_rcv_wnd: rcv_wnd,
            tcp_info_rehash: rehash,
            tcp_info_total_rto: total_rto,
            tcp_info_total_rto_recoveries: total_rto_recoveries,
            tcp_info_total_rto_time: total_rto_time,
            tcp_info_received_ce: received_ce,
            tcp_info_delivered_e1_bytes: delivered_e1_bytes,
            tcp_info_delivered_e0_bytes: delivered_e0_bytes,
            tcp_info_delivered_ce_bytes: delivered_ce_bytes,
            tcp_info_received_e1_bytes: received_e1_bytes,
            tcp_info_received_e0_bytes: received_e0_bytes,
            tcp_info_received_ce_bytes: received_ce_bytes,
            tcp_info_accecn_fail_mode: accecn_fail_mode,
            tcp_info_accecn_opt_seen: accecn_opt_seen,
            tcp_info_ecn_mode: ecn_mode,
            tcp_info_options2: options2,
        });

        r.congestion_algorithm_string.clear();
        r.congestion_algorithm_string
            .push_str(s.congestion.unwrap_or_default());
        r.congestion_algorithm_enum = congestion_enum(s.congestion) as i32;

        r.type_of_service = s.tos.map(Into::into);
        r.traffic_class = s.tclass.map(Into::into);
        r.shutdown_state = s.shutdown.map(Into::into);
        r.socket_mark = s.mark;
        r.class_id = s.class_id;
        r.cgroup_id = s.cgroup_id;
        r.sockopt = s.sockopt.map(Into::into);
        r.skv6only = s.skv6only;
        r.unknown_attributes = s.unknown_attributes.into();

        opt!(r, s.skmeminfo.as_ref(), {
            sk_mem_info_rmem_alloc: rmem_alloc,
            sk_mem_info_rcvbuf: rcvbuf,
            sk_mem_info_wmem_alloc: wmem_alloc,
            sk_mem_info_sndbuf: sndbuf,
            sk_mem_info_fwd_alloc: fwd_alloc,
            sk_mem_info_wmem_queued: wmem_queued,
            sk_mem_info_optmem: optmem,
            sk_mem_info_backlog: backlog,
            sk_mem_info_drops: drops,
        });
        opt_fixed!(r, s.vegas, {
            vegas_info_enabled: enabled,
            vegas_info_rtt_cnt: rtt_cnt,
            vegas_info_rtt: rtt,
            vegas_info_min_rtt: min_rtt,
        });
        opt_fixed!(r, s.dctcp, {
            dctcp_info_enabled: enabled,
            dctcp_info_ce_state: ce_state,
            dctcp_info_alpha: alpha,
            dctcp_info_ab_ecn: ab_ecn,
            dctcp_info_ab_tot: ab_tot,
        });
        opt_fixed!(r, s.bbr, {
            bbr_info_bw: bw,
            bbr_info_min_rtt: min_rtt,
            bbr_info_pacing_gain: pacing_gain,
            bbr_info_cwnd_gain: cwnd_gain,
        });
        &self.record
    }
}

/// Overwrites `dst` with `src`, keeping its allocation.
fn replace(dst: &mut Vec<u8>, src: &[u8]) {
    dst.clear();
    dst.extend_from_slice(src);
}

/// Maps the kernel's module name (`tcp_congestion_ops.name`) to the enum.
pub fn congestion_enum(name: Option<&str>) -> CongestionAlgorithm {
    use CongestionAlgorithm as C;
    let Some(name) = name else {
        return C::Unspecified;
    };
    match name {
        "cubic" => C::Cubic,
        "bbr" => C::Bbr,
        "reno" => C::Reno,
        "dctcp" => C::Dctcp,
        "vegas" => C::Vegas,
        "prague" => C::Prague,
        "bbr2" => C::Bbr2,
        "bbr3" => C::Bbr3,
        "htcp" => C::Htcp,
        "bic" => C::Bic,
        "westwood" => C::Westwood,
        "illinois" => C::Illinois,
        "hybla" => C::Hybla,
        "highspeed" => C::Highspeed,
        "scalable" => C::Scalable,
        "veno" => C::Veno,
        "yeah" => C::Yeah,
        "lp" => C::Lp,
        "nv" => C::Nv,
        "cdg" => C::Cdg,
        _ => C::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enum_name_maps_back() {
        // The enum's proto names are CONGESTION_ALGORITHM_<KERNEL NAME>.
        for v in 2..=21 {
            let c = CongestionAlgorithm::try_from(v).unwrap();
            let kernel = c
                .as_str_name()
                .trim_start_matches("CONGESTION_ALGORITHM_")
                .to_lowercase();
            assert_eq!(congestion_enum(Some(&kernel)), c, "{kernel}");
        }
        assert_eq!(congestion_enum(None), CongestionAlgorithm::Unspecified);
        assert_eq!(congestion_enum(Some("my_cc")), CongestionAlgorithm::Unknown);
    }
}
