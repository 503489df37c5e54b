//! The query of docs/lifecycle.md ("One row per connection"), as written
//! there, in real ClickHouse (chdb, through `tools/clickhouse/check.py
//! --connections`) over records landed by the DDL of docs/kafka.md.

use prost::Message;
use serde_json::Value;
use xtcp::export::record::SCHEMA_VERSION;
use xtcp_feed::proto::{Record, RecordKind};

use crate::common::{can_run, clickhouse_check, Need};

/// A record of the socket `cookie` at `at_ns`, as a poll (`poll_id` > 0)
/// or a close (0) saw it.
fn record(
    cookie: u64,
    sport: u32,
    dport: u32,
    state: u32,
    at_ns: u64,
    poll_id: u64,
    acked: u64,
) -> Record {
    Record {
        schema_version: SCHEMA_VERSION,
        hostname: "h".into(),
        instance: 5,
        poll_id,
        poll_timestamp_ns: at_ns,
        netns_inode: 4026531840,
        record_kind: if poll_id == 0 {
            RecordKind::Closed
        } else {
            RecordKind::Polled
        } as i32,
        inet_diag_msg_family: libc::AF_INET as u32,
        inet_diag_msg_state: state,
        inet_diag_msg_socket_source: vec![127, 0, 0, 1],
        inet_diag_msg_socket_destination: vec![127, 0, 0, 1],
        inet_diag_msg_socket_source_port: sport,
        inet_diag_msg_socket_destination_port: dport,
        inet_diag_msg_socket_cookie: cookie,
        tcp_info_bytes_acked: Some(acked),
        ..Default::default()
    }
}

#[test]
fn one_row_per_connection_with_first_last_and_final_counters() {
    if !can_run(&[Need::Python("chdb")]) {
        return;
    }
    let s = 1_000_000_000;
    let records = [
        // A listener, polled twice: left out.
        record(13, 40001, 0, 10, s, 1, 0),
        record(13, 40001, 0, 10, 2 * s, 2, 0),
        // Connection A: polled twice, then closed.
        record(11, 5000, 40001, 1, s, 1, 100),
        record(11, 5000, 40001, 1, 2 * s, 2, 200),
        record(11, 5000, 40001, 7, 2 * s + 500, 0, 300),
        // Connection B: polled once, then closed.
        record(12, 5001, 40001, 1, 2 * s, 2, 50),
        record(12, 5001, 40001, 7, 3 * s, 0, 60),
    ];
    let mut messages = Vec::new();
    for (counter, mut r) in records.into_iter().enumerate() {
        r.record_counter = counter as u64 + 1;
        r.encode_length_delimited(&mut messages).unwrap();
    }
    let stdout = clickhouse_check(&["--connections"], &messages);
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    let number = |v: &Value| v.as_u64().or_else(|| v.as_str()?.parse().ok()).unwrap();
    for (row, (cookie, first, last, acked)) in rows
        .iter()
        .zip([(11, s, 2 * s + 500, 300), (12, 2 * s, 3 * s, 60)])
    {
        assert_eq!(number(&row["cookie"]), cookie, "{row}");
        assert_eq!(number(&row["first_seen_ns"]), first, "{row}");
        assert_eq!(number(&row["last_seen_ns"]), last, "{row}");
        assert_eq!(number(&row["bytes_acked"]), acked, "{row}");
        assert_eq!(
            row["closed"]
                .as_bool()
                .or(row["closed"].as_u64().map(|v| v == 1)),
            Some(true),
            "{row}"
        );
        assert_eq!(row["source"], "127.0.0.1", "{row}");
        assert_eq!(number(&row["destination_port"]), 40001, "{row}");
    }
}
