//! What `xtcp-top` shows: the sockets of the last whole poll, one row each,
//! sorted, with the rate each one's bytes moved since the poll before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use prost::Message;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Paragraph, Row, Table};
use ratatui::Frame;
use xtcp::attribution::service_of;
use xtcp::export::text::endpoint;
use xtcp::wire::state;
use xtcp_feed::proto::Record;

/// How rows are ordered, busiest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// Smoothed RTT.
    Rtt,
    /// Retransmitted segments, all time.
    Retrans,
    /// Bytes acknowledged and received, all time.
    Bytes,
    /// Bytes acknowledged and received per second since the poll before.
    Rate,
}

impl SortKey {
    fn name(self) -> &'static str {
        match self {
            SortKey::Rtt => "rtt",
            SortKey::Retrans => "retrans",
            SortKey::Bytes => "bytes",
            SortKey::Rate => "rate",
        }
    }
}

/// A poll is whole once no record of it came for this long: a poll's
/// records arrive as one burst.
const QUIET: Duration = Duration::from_millis(200);

/// One socket as a poll saw it.
#[derive(Debug, Clone)]
struct Conn {
    netns: String,
    service: String,
    state: String,
    local: String,
    peer: String,
    cc: String,
    rtt_us: u32,
    retrans: u32,
    bytes: u64,
    /// Bytes per second since the poll before (0 for a socket new to it).
    rate: f64,
    at_ns: u64,
}

pub struct View {
    sort: SortKey,
    filter: Option<String>,
    /// Only services containing this.
    service: Option<String>,
    /// The last whole poll, sorted.
    shown: Vec<Conn>,
    shown_poll: u64,
    /// The poll arriving, by (namespace, cookie).
    building: HashMap<(u64, u64), Conn>,
    building_poll: u64,
    last_record: Option<Instant>,
    /// Bytes and time of each socket in the last whole poll.
    before: HashMap<(u64, u64), (u64, u64)>,
    /// The last line the pipeline said (a warning), shown under the keys.
    said: Option<String>,
}

impl View {
    pub fn new(sort: SortKey, filter: Option<String>, service: Option<String>) -> Self {
        View {
            sort,
            filter,
            service,
            shown: Vec::new(),
            shown_poll: 0,
            building: HashMap::new(),
            building_poll: 0,
            last_record: None,
            before: HashMap::new(),
            said: None,
        }
    }

    /// The pipeline's last stderr line, to show.
    pub fn said(&mut self, line: Option<String>) {
        self.said = line;
    }

    /// Takes one batch of encoded records.
    pub fn add(&mut self, batch: &[Vec<u8>]) {
        for bytes in batch {
            let Ok(r) = Record::decode(bytes.as_slice()) else {
                continue;
            };
            if r.poll_id != self.building_poll {
                self.complete();
                self.building_poll = r.poll_id;
            }
            // Every record of the poll, shown or not, says it is still coming.
            self.last_record = Some(Instant::now());
            let service = service_of(&r.cgroup_path, &r.systemd_unit, &r.container_id, &r.pod_uid);
            if self
                .service
                .as_ref()
                .is_some_and(|want| !service.contains(want.as_str()))
            {
                continue;
            }
            let key = (r.netns_inode, r.inet_diag_msg_socket_cookie);
            let total =
                r.tcp_info_bytes_acked.unwrap_or(0) + r.tcp_info_bytes_received.unwrap_or(0);
            let rate = self.before.get(&key).map_or(0.0, |&(was, at)| {
                let seconds = r.poll_timestamp_ns.saturating_sub(at) as f64 / 1e9;
                if seconds > 0.0 {
                    total.saturating_sub(was) as f64 / seconds
                } else {
                    0.0
                }
            });
            let label = u8::try_from(r.inet_diag_msg_state)
                .ok()
                .and_then(state::label)
                .unwrap_or("?");
            let conn = Conn {
                netns: r.netns_name.clone(),
                service: service.to_string(),
                state: label.to_string(),
                local: endpoint(
                    &r.inet_diag_msg_socket_source,
                    r.inet_diag_msg_socket_source_port,
                ),
                peer: endpoint(
                    &r.inet_diag_msg_socket_destination,
                    r.inet_diag_msg_socket_destination_port,
                ),
                cc: r.congestion_algorithm_string.clone(),
                rtt_us: r.tcp_info_rtt.unwrap_or(0),
                retrans: r.tcp_info_total_retrans.unwrap_or(0),
                bytes: total,
                rate,
                at_ns: r.poll_timestamp_ns,
            };
            self.building.insert(key, conn);
        }
    }

    /// Shows the poll arriving once it is quiet.
    pub fn settle(&mut self) {
        if self.last_record.is_some_and(|t| t.elapsed() >= QUIET) {
            self.complete();
        }
    }

    /// The poll arriving becomes the one shown.
    fn complete(&mut self) {
        if self.building.is_empty() {
            return;
        }
        self.before = self
            .building
            .iter()
            .map(|(key, c)| (*key, (c.bytes, c.at_ns)))
            .collect();
        self.shown = self.building.drain().map(|(_, c)| c).collect();
        self.shown_poll = self.building_poll;
        self.last_record = None;
        self.sort_rows();
    }

    fn sort_rows(&mut self) {
        let key = self.sort;
        self.shown.sort_by(|a, b| {
            let value = |c: &Conn| match key {
                SortKey::Rtt => f64::from(c.rtt_us),
                SortKey::Retrans => f64::from(c.retrans),
                SortKey::Bytes => c.bytes as f64,
                SortKey::Rate => c.rate,
            };
            value(b)
                .total_cmp(&value(a))
                .then_with(|| a.local.cmp(&b.local))
        });
    }

    /// A key pressed (other than quit).
    pub fn key(&mut self, c: char) {
        let sort = match c {
            'r' => SortKey::Rtt,
            't' => SortKey::Retrans,
            'b' => SortKey::Bytes,
            'd' => SortKey::Rate,
            _ => return,
        };
        self.sort = sort;
        self.sort_rows();
    }

    pub fn draw(&self, frame: &mut Frame<'_>) {
        let [head, body] =
            Layout::vertical([Constraint::Length(3), Constraint::Min(1)]).areas(frame.area());
        let filter = self.filter.as_deref().unwrap_or("none");
        let service = self.service.as_deref().unwrap_or("any");
        let text = format!(
            "xtcp-top: {} sockets, poll {}, sorted by {}, filter: {filter}, service: {service}\n\
             keys: r rtt, t retrans, b bytes, d rate, q quit\n{}",
            self.shown.len(),
            self.shown_poll,
            self.sort.name(),
            self.said.as_deref().unwrap_or("")
        );
        frame.render_widget(Paragraph::new(text), head);
        let header = Row::new([
            "NETNS", "SERVICE", "STATE", "LOCAL", "PEER", "CC", "RTT_MS", "RETRANS", "BYTES",
            "RATE_B/S",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD));
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let rows = self.shown.iter().take(usize::from(body.height)).map(|c| {
            Row::new([
                dash(&c.netns),
                dash(&c.service),
                c.state.clone(),
                c.local.clone(),
                c.peer.clone(),
                c.cc.clone(),
                format!("{:.3}", f64::from(c.rtt_us) / 1000.0),
                c.retrans.to_string(),
                c.bytes.to_string(),
                format!("{:.0}", c.rate),
            ])
        });
        let widths = [
            Constraint::Length(12),
            Constraint::Length(24),
            Constraint::Length(11),
            Constraint::Length(28),
            Constraint::Length(28),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(14),
            Constraint::Length(14),
        ];
        frame.render_widget(Table::new(rows, widths).header(header), body);
    }
}
