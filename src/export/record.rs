//! Decoded socket -> protobuf record bytes.
//!
//! [`RecordEncoder`] writes each field of `proto/xtcp.proto`'s `Record`
//! straight from the borrowed views of a [`DiagSocket`] into a caller's
//! buffer, in field-number order, with the keys `build.rs` generates: no
//! intermediate struct, no allocation. The bytes are exactly what prost
//! would encode for the same `Record` (`tests/it/encode.rs`). Readers who want
//! the struct (the JSON output) decode them with prost.
//! Runs in whichever thread decodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::attribution::processes::{Lookup, ProcessView, MAX_COMMAND_LEN, MAX_PROCESSES_LEN};
use crate::attribution::{
    CgroupView, Owner, CONTAINER_ID_LEN, MAX_CGROUP_PATH_LEN, MAX_UNIT_LEN, POD_UID_LEN,
};
use crate::export::encode::{Writer, FIELD_WINDOW};
use crate::identity::Identity;
use crate::wire::inet_diag::TCP_CA_NAME_MAX;
use crate::wire::DiagSocket;
use xtcp_feed::proto::{key, CongestionAlgorithm, ProcessOwner, RecordKind};

/// Bumped whenever fields are added to `proto/xtcp.proto` (2: the
/// network namespace; 3: the instance; 4: the record kind; 5: the cgroup
/// path and owner, and the processes).
pub const SCHEMA_VERSION: u32 = 5;

/// Longest `netns_name`: a file name under /run/netns, or a `--netns` path
/// (the config refuses longer ones).
pub const MAX_NETNS_NAME_LEN: usize = 255;

/// What every record of one dump (or one batch of closes) shares: the
/// poll, the namespace and the kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollStamp {
    /// 1 for the first poll.
    pub poll_id: u64,
    /// Poll start (or when closes were received), ns since the Unix epoch.
    pub timestamp_ns: u64,
    pub kind: RecordKind,
    pub netns_inode: u64,
    /// At most [`MAX_NETNS_NAME_LEN`] bytes, or records may not fit the
    /// buffer of [`RecordEncoder::max_record_len`] (encode fails, no panic).
    pub netns_name: Arc<str>,
}

impl PollStamp {
    /// The stamp of poll `poll_id`, taken now, in the exporter's own
    /// namespace.
    pub fn now(poll_id: u64) -> Self {
        PollStamp {
            poll_id,
            timestamp_ns: unix_ns(),
            ..PollStamp::default()
        }
    }
}

/// Now, in ns since the Unix epoch (0 on a clock before it).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Encodes decoded sockets as `Record`s; numbers them as it goes.
///
/// Clones share the `record_counter` sequence, so the inetdiager threads of
/// one exporter hand out each number once and a consumer can tell from a gap
/// that something was lost. Numbers are taken from the shared counter in
/// blocks ([`Self::reserve`], one atomic add per netlink buffer): an atomic
/// add per record cost ~15% of the encode time. A caller reserves exactly
/// as many numbers as it will encode records, so numbers have no gaps.
#[derive(Debug, Clone)]
pub struct RecordEncoder {
    identity: Identity,
    /// Resolves cgroup ids to owners; `None`: records have no path.
    cgroups: Option<CgroupView>,
    /// `--processes`: resolves socket inodes to their processes.
    processes: Option<ProcessView>,
    counter: Arc<AtomicU64>,
    /// The next number to write, and the end of the reserved block.
    next: u64,
    end: u64,
}

impl RecordEncoder {
    pub fn new(identity: Identity) -> Self {
        RecordEncoder {
            identity,
            cgroups: None,
            processes: None,
            counter: Arc::new(AtomicU64::new(0)),
            next: 1,
            end: 1,
        }
    }

    /// Records from now on carry their socket's cgroup path and owner,
    /// resolved through `view` (clones too, each with its own view).
    pub fn with_cgroups(mut self, view: CgroupView) -> Self {
        self.cgroups = Some(view);
        self
    }

    /// Records from now on name their socket's processes (`--processes`),
    /// resolved through `view`.
    pub fn with_processes(mut self, view: ProcessView) -> Self {
        self.processes = Some(view);
        self
    }

    /// Reserves the numbers of the next `n` records. Numbers left over from
    /// the previous block are not used: reserve only for records that will
    /// be encoded (decoded sockets), or the run's numbers have gaps.
    pub fn reserve(&mut self, n: u64) {
        let base = self.counter.fetch_add(n, Ordering::Relaxed);
        (self.next, self.end) = (base + 1, base + 1 + n);
    }

    /// The `record_counter` of the last record this encoder wrote (0 before
    /// the first).
    pub fn last_number(&self) -> u64 {
        self.next - 1
    }

    /// The highest number any clone of this encoder has reserved (0 before
    /// the first): where a watermark stands.
    pub fn numbered(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }

    /// A buffer this long always holds one record of any socket the decoder
    /// accepts (addresses are 4 or 16 bytes, names shorter than
    /// `TCP_CA_NAME_MAX`; the fuzz target checks the bound).
    pub fn max_record_len(&self) -> usize {
        // Length-delimited fields: hostname, namespace name, two addresses,
        // congestion name, the cgroup path, unit, container and pod, the
        // command and the processes, each with a key and a length varint;
        // plus the writer's window slack.
        key::MAX_SCALAR_LEN
            + 11 * FIELD_WINDOW
            + self.identity.hostname.len()
            + MAX_NETNS_NAME_LEN
            + 16
            + 16
            + TCP_CA_NAME_MAX
            + MAX_CGROUP_PATH_LEN
            + MAX_UNIT_LEN
            + CONTAINER_ID_LEN
            + POD_UID_LEN
            + MAX_COMMAND_LEN
            + MAX_PROCESSES_LEN
            + FIELD_WINDOW
    }

    /// Encodes `s` into `buf` and returns the length, or `None` (using no
    /// number) when `buf` is shorter than the record. Reserves one number if
    /// the block is used up.
    pub fn encode(
        &mut self,
        s: &DiagSocket<'_>,
        poll: &PollStamp,
        buf: &mut [u8],
    ) -> Option<usize> {
        if self.next == self.end {
            self.reserve(1);
        }
        let owner = match (&mut self.cgroups, s.cgroup_id) {
            (Some(cgroups), Some(id)) => cgroups.owner(id),
            _ => None,
        };
        // Closes come as they happen, between polls: they take what the
        // table knows and never make the closer wait for a scan.
        let may_scan = poll.kind != RecordKind::Closed;
        let processes = self.processes.as_mut().map(|p| {
            let cgroup = owner.map(|o| &*o.path);
            p.holders(s.msg.inode(), cgroup, poll.poll_id, may_scan)
        });
        let len = encode_fields(s, poll, &self.identity, self.next, buf)?;
        let len = len + encode_owner(owner, processes, &mut buf[len..])?;
        self.next += 1;
        Some(len)
    }
}

/// Writes every `Record` field, in field-number order (keys from build.rs).
#[inline(always)]
fn encode_fields(
    s: &DiagSocket<'_>,
    poll: &PollStamp,
    identity: &Identity,
    counter: u64,
    buf: &mut [u8],
) -> Option<usize> {
    let mut w = Writer::new(buf);
    w.uint(key::SCHEMA_VERSION, SCHEMA_VERSION)?;
    w.bytes(key::HOSTNAME, identity.hostname.as_bytes())?;
    w.uint(key::POLL_TIMESTAMP_NS, poll.timestamp_ns)?;
    w.uint(key::POLL_ID, poll.poll_id)?;
    w.uint(key::RECORD_COUNTER, counter)?;
    w.uint(key::NETNS_INODE, poll.netns_inode)?;
    w.bytes(key::NETNS_NAME, poll.netns_name.as_bytes())?;
    w.uint(key::INSTANCE, identity.instance)?;
    w.uint(key::RECORD_KIND, poll.kind as u32)?;

    let m = &s.msg;
    w.uint(key::INET_DIAG_MSG_FAMILY, m.family())?;
    w.uint(key::INET_DIAG_MSG_STATE, m.state())?;
    w.uint(key::INET_DIAG_MSG_TIMER, m.timer())?;
    w.uint(key::INET_DIAG_MSG_RETRANS, m.retrans())?;
    w.uint(key::INET_DIAG_MSG_SOCKET_SOURCE_PORT, m.source_port())?;
    w.uint(
        key::INET_DIAG_MSG_SOCKET_DESTINATION_PORT,
        m.destination_port(),
    )?;
    w.bytes(key::INET_DIAG_MSG_SOCKET_SOURCE, m.source())?;
    w.bytes(key::INET_DIAG_MSG_SOCKET_DESTINATION, m.destination())?;
    w.uint(key::INET_DIAG_MSG_SOCKET_INTERFACE, m.interface())?;
    w.uint(key::INET_DIAG_MSG_SOCKET_COOKIE, m.cookie())?;
    w.uint(key::INET_DIAG_MSG_EXPIRES, m.expires())?;
    w.uint(key::INET_DIAG_MSG_RQUEUE, m.rqueue())?;
    w.uint(key::INET_DIAG_MSG_WQUEUE, m.wqueue())?;
    w.uint(key::INET_DIAG_MSG_UID, m.uid())?;
    w.uint(key::INET_DIAG_MSG_INODE, m.inode())?;

    if let Some(mi) = &s.meminfo {
        w.field(key::MEM_INFO_RMEM, mi.rmem().into())?;
        w.field(key::MEM_INFO_WMEM, mi.wmem().into())?;
        w.field(key::MEM_INFO_FMEM, mi.fmem().into())?;
        w.field(key::MEM_INFO_TMEM, mi.tmem().into())?;
    }

    if let Some(t) = &s.tcp_info {
        w.uint(key::TCP_INFO_LEN, t.len() as u64)?;
        w.opt(key::TCP_INFO_STATE, t.state())?;
        w.opt(key::TCP_INFO_CA_STATE, t.ca_state())?;
        w.opt(key::TCP_INFO_RETRANSMITS, t.retransmits())?;
        w.opt(key::TCP_INFO_PROBES, t.probes())?;
        w.opt(key::TCP_INFO_BACKOFF, t.backoff())?;
        w.opt(key::TCP_INFO_OPTIONS, t.options())?;
        w.opt(key::TCP_INFO_SND_WSCALE, t.snd_wscale())?;
        w.opt(key::TCP_INFO_RCV_WSCALE, t.rcv_wscale())?;
        w.opt(
            key::TCP_INFO_DELIVERY_RATE_APP_LIMITED,
            t.delivery_rate_app_limited(),
        )?;
        w.opt(key::TCP_INFO_FASTOPEN_CLIENT_FAIL, t.fastopen_client_fail())?;
        w.opt(key::TCP_INFO_RTO, t.rto())?;
        w.opt(key::TCP_INFO_ATO, t.ato())?;
        w.opt(key::TCP_INFO_SND_MSS, t.snd_mss())?;
        w.opt(key::TCP_INFO_RCV_MSS, t.rcv_mss())?;
        w.opt(key::TCP_INFO_UNACKED, t.unacked())?;
        w.opt(key::TCP_INFO_SACKED, t.sacked())?;
        w.opt(key::TCP_INFO_LOST, t.lost())?;
        w.opt(key::TCP_INFO_RETRANS, t.retrans())?;
        w.opt(key::TCP_INFO_FACKETS, t.fackets())?;
        w.opt(key::TCP_INFO_LAST_DATA_SENT, t.last_data_sent())?;
        w.opt(key::TCP_INFO_LAST_ACK_SENT, t.last_ack_sent())?;
        w.opt(key::TCP_INFO_LAST_DATA_RECV, t.last_data_recv())?;
        w.opt(key::TCP_INFO_LAST_ACK_RECV, t.last_ack_recv())?;
        w.opt(key::TCP_INFO_PMTU, t.pmtu())?;
        w.opt(key::TCP_INFO_RCV_SSTHRESH, t.rcv_ssthresh())?;
        w.opt(key::TCP_INFO_RTT, t.rtt())?;
        w.opt(key::TCP_INFO_RTTVAR, t.rttvar())?;
        w.opt(key::TCP_INFO_SND_SSTHRESH, t.snd_ssthresh())?;
        w.opt(key::TCP_INFO_SND_CWND, t.snd_cwnd())?;
        w.opt(key::TCP_INFO_ADVMSS, t.advmss())?;
        w.opt(key::TCP_INFO_REORDERING, t.reordering())?;
        w.opt(key::TCP_INFO_RCV_RTT, t.rcv_rtt())?;
        w.opt(key::TCP_INFO_RCV_SPACE, t.rcv_space())?;
        w.opt(key::TCP_INFO_TOTAL_RETRANS, t.total_retrans())?;
        w.opt(key::TCP_INFO_PACING_RATE, t.pacing_rate())?;
        w.opt(key::TCP_INFO_MAX_PACING_RATE, t.max_pacing_rate())?;
        w.opt(key::TCP_INFO_BYTES_ACKED, t.bytes_acked())?;
        w.opt(key::TCP_INFO_BYTES_RECEIVED, t.bytes_received())?;
        w.opt(key::TCP_INFO_SEGS_OUT, t.segs_out())?;
        w.opt(key::TCP_INFO_SEGS_IN, t.segs_in())?;
        w.opt(key::TCP_INFO_NOTSENT_BYTES, t.notsent_bytes())?;
        w.opt(key::TCP_INFO_MIN_RTT, t.min_rtt())?;
        w.opt(key::TCP_INFO_DATA_SEGS_IN, t.data_segs_in())?;
        w.opt(key::TCP_INFO_DATA_SEGS_OUT, t.data_segs_out())?;
        w.opt(key::TCP_INFO_DELIVERY_RATE, t.delivery_rate())?;
        w.opt(key::TCP_INFO_BUSY_TIME, t.busy_time())?;
        w.opt(key::TCP_INFO_RWND_LIMITED, t.rwnd_limited())?;
        w.opt(key::TCP_INFO_SNDBUF_LIMITED, t.sndbuf_limited())?;
        w.opt(key::TCP_INFO_DELIVERED, t.delivered())?;
        w.opt(key::TCP_INFO_DELIVERED_CE, t.delivered_ce())?;
        w.opt(key::TCP_INFO_BYTES_SENT, t.bytes_sent())?;
        w.opt(key::TCP_INFO_BYTES_RETRANS, t.bytes_retrans())?;
        w.opt(key::TCP_INFO_DSACK_DUPS, t.dsack_dups())?;
        w.opt(key::TCP_INFO_REORD_SEEN, t.reord_seen())?;
        w.opt(key::TCP_INFO_RCV_OOOPACK, t.rcv_ooopack())?;
        w.opt(key::TCP_INFO_SND_WND, t.snd_wnd())?;
        w.opt(key::TCP_INFO_RCV_WND, t.rcv_wnd())?;
        w.opt(key::TCP_INFO_REHASH, t.rehash())?;
        w.opt(key::TCP_INFO_TOTAL_RTO, t.total_rto())?;
        w.opt(key::TCP_INFO_TOTAL_RTO_RECOVERIES, t.total_rto_recoveries())?;
        w.opt(key::TCP_INFO_TOTAL_RTO_TIME, t.total_rto_time())?;
        w.opt(key::TCP_INFO_RECEIVED_CE, t.received_ce())?;
        w.opt(key::TCP_INFO_DELIVERED_E1_BYTES, t.delivered_e1_bytes())?;
        w.opt(key::TCP_INFO_DELIVERED_E0_BYTES, t.delivered_e0_bytes())?;
        w.opt(key::TCP_INFO_DELIVERED_CE_BYTES, t.delivered_ce_bytes())?;
        w.opt(key::TCP_INFO_RECEIVED_E1_BYTES, t.received_e1_bytes())?;
        w.opt(key::TCP_INFO_RECEIVED_E0_BYTES, t.received_e0_bytes())?;
        w.opt(key::TCP_INFO_RECEIVED_CE_BYTES, t.received_ce_bytes())?;
        w.opt(key::TCP_INFO_ACCECN_FAIL_MODE, t.accecn_fail_mode())?;
        w.opt(key::TCP_INFO_ACCECN_OPT_SEEN, t.accecn_opt_seen())?;
        w.opt(key::TCP_INFO_ECN_MODE, t.ecn_mode())?;
        w.opt(key::TCP_INFO_OPTIONS2, t.options2())?;
    }

    let congestion = s.congestion.unwrap_or_default();
    w.bytes(key::CONGESTION_ALGORITHM_STRING, congestion.as_bytes())?;
    w.uint(
        key::CONGESTION_ALGORITHM_ENUM,
        congestion_enum(s.congestion) as u32,
    )?;

    w.opt(key::TYPE_OF_SERVICE, s.tos)?;
    w.opt(key::TRAFFIC_CLASS, s.tclass)?;
    w.opt(key::SHUTDOWN_STATE, s.shutdown)?;
    w.opt(key::SOCKET_MARK, s.mark)?;
    w.opt(key::CLASS_ID, s.class_id)?;
    w.opt(key::CGROUP_ID, s.cgroup_id)?;
    w.opt(key::SOCKOPT, s.sockopt)?;
    w.opt(key::SKV6ONLY, s.skv6only)?;
    w.uint(key::UNKNOWN_ATTRIBUTES, s.unknown_attributes)?;

    if let Some(sk) = &s.skmeminfo {
        w.opt(key::SK_MEM_INFO_RMEM_ALLOC, sk.rmem_alloc())?;
        w.opt(key::SK_MEM_INFO_RCVBUF, sk.rcvbuf())?;
        w.opt(key::SK_MEM_INFO_WMEM_ALLOC, sk.wmem_alloc())?;
        w.opt(key::SK_MEM_INFO_SNDBUF, sk.sndbuf())?;
        w.opt(key::SK_MEM_INFO_FWD_ALLOC, sk.fwd_alloc())?;
        w.opt(key::SK_MEM_INFO_WMEM_QUEUED, sk.wmem_queued())?;
        w.opt(key::SK_MEM_INFO_OPTMEM, sk.optmem())?;
        w.opt(key::SK_MEM_INFO_BACKLOG, sk.backlog())?;
        w.opt(key::SK_MEM_INFO_DROPS, sk.drops())?;
    }
    if let Some(v) = &s.vegas {
        w.field(key::VEGAS_INFO_ENABLED, v.enabled().into())?;
        w.field(key::VEGAS_INFO_RTT_CNT, v.rtt_cnt().into())?;
        w.field(key::VEGAS_INFO_RTT, v.rtt().into())?;
        w.field(key::VEGAS_INFO_MIN_RTT, v.min_rtt().into())?;
    }
    if let Some(d) = &s.dctcp {
        w.field(key::DCTCP_INFO_ENABLED, d.enabled().into())?;
        w.field(key::DCTCP_INFO_CE_STATE, d.ce_state().into())?;
        w.field(key::DCTCP_INFO_ALPHA, d.alpha().into())?;
        w.field(key::DCTCP_INFO_AB_ECN, d.ab_ecn().into())?;
        w.field(key::DCTCP_INFO_AB_TOT, d.ab_tot().into())?;
    }
    if let Some(b) = &s.bbr {
        w.field(key::BBR_INFO_BW, b.bw())?;
        w.field(key::BBR_INFO_MIN_RTT, b.min_rtt().into())?;
        w.field(key::BBR_INFO_PACING_GAIN, b.pacing_gain().into())?;
        w.field(key::BBR_INFO_CWND_GAIN, b.cwnd_gain().into())?;
    }
    Some(w.len())
}

/// The owner fields (190..), after every other: they come from the cgroup
/// map and the process table, not the socket's bytes.
fn encode_owner(
    owner: Option<&Owner>,
    processes: Option<Lookup<'_>>,
    buf: &mut [u8],
) -> Option<usize> {
    let mut w = Writer::new(buf);
    if let Some(o) = owner {
        w.bytes(key::CGROUP_PATH, o.path.as_bytes())?;
        w.bytes(key::SYSTEMD_UNIT, o.systemd_unit.as_bytes())?;
        w.bytes(key::CONTAINER_ID, o.container_id.as_bytes())?;
        w.bytes(key::POD_UID, o.pod_uid.as_bytes())?;
    }
    let state = match processes {
        None => ProcessOwner::Unspecified,
        Some(Lookup::Found(h)) => {
            w.uint(key::PROCESS_ID, h.pid)?;
            w.bytes(key::PROCESS_COMMAND, h.command.as_bytes())?;
            w.bytes(key::PROCESSES, h.listed.as_bytes())?;
            w.uint(key::PROCESS_COUNT, h.count)?;
            ProcessOwner::Found
        }
        Some(Lookup::NoInode) => ProcessOwner::None,
        Some(Lookup::NotFound) => ProcessOwner::NotFound,
    };
    w.uint(key::PROCESS_OWNER, state as u32)?;
    Some(w.len())
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
