//! `xtcp-debug-server`: receives the exporter's UDP datagrams and prints
//! every record, one JSON object per line (default) or, with `--format text`,
//! one `ss`-like line per socket. Undecodable datagrams are counted and
//! reported on stderr, never fatal. It tracks the numbers of each exporter
//! run and reads its socket's drop counter, so its totals say what never
//! arrived (`xtcp::export::sequence`). On SIGINT/SIGTERM it prints what is
//! already queued on its socket, then its totals to stderr, and exits 0 (also
//! when stdout closes).

use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use xtcp::cli::exit_for;
use xtcp::export::auth::FeedKeys;
use xtcp::export::sequence::{Loss, LossWatch, RecordId, DEFAULT_RUN_LIMIT};
use xtcp::export::udp::{bind_receiver, count_records, decode_datagram, nothing_yet};
use xtcp::proto::{Record, RecordKind};
use xtcp::shutdown::{Shutdown, SignalThread};
use xtcp::wire::state;

/// Warnings printed for undecodable datagrams before going quiet (they
/// are still counted).
const MAX_WARNINGS: u64 = 10;
/// How often the receive loop looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One JSON object per record (proto field names).
    Json,
    /// One readable line per socket, like `ss -ti`.
    Text,
    /// Print nothing per record; only the totals at exit (a counting sink
    /// for benchmarks that still decodes every record).
    None,
    /// Like none, but decode nothing: count the records of each batch from
    /// its framing (the cheapest receiver, so it takes as little CPU as
    /// possible from what a benchmark measures). Reading no record, it
    /// cannot tell lost records: they are `untracked`.
    Count,
}

/// Print the records an xtcp exporter sends over UDP.
#[derive(Debug, Parser)]
#[command(name = "xtcp-debug-server", version, about, long_about = None)]
struct Cli {
    /// Address to receive on.
    #[arg(long, env = "XTCP_DEBUG_LISTEN", default_value = "127.0.0.1:13000")]
    listen: SocketAddr,

    /// Output format.
    #[arg(long, env = "XTCP_DEBUG_FORMAT", value_enum, default_value_t = Format::Json)]
    format: Format,

    /// Socket receive buffer to ask for, in bytes: a poll arrives as a burst,
    /// and a small buffer drops datagrams. Above net.core.rmem_max this needs
    /// root (SO_RCVBUFFORCE).
    #[arg(long, env = "XTCP_DEBUG_RECV_BUFFER", default_value_t = 32 << 20)]
    recv_buffer: usize,

    /// Read only datagrams signed with the key in this file (as the
    /// exporter's --feed-key); given twice, either key.
    #[arg(
        long,
        env = "XTCP_DEBUG_FEED_KEY",
        value_name = "FILE",
        value_delimiter = ','
    )]
    feed_key: Vec<PathBuf>,
}

#[derive(Debug, Default)]
struct Totals {
    datagrams: u64,
    bytes: u64,
    records: u64,
    unauthenticated: u64,
    undecodable: u64,
    loss: Loss,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit_for(&e),
    };
    match serve(&cli) {
        Ok(totals) => {
            eprintln!(
                "xtcp-debug-server: stopped: datagrams {} bytes {} records {} unauthenticated {} \
                 undecodable {}{}",
                totals.datagrams,
                totals.bytes,
                totals.records,
                totals.unauthenticated,
                totals.undecodable,
                totals.loss.exit_fields()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open(cli: &Cli) -> io::Result<UdpSocket> {
    let socket = bind_receiver(cli.listen, cli.recv_buffer, "xtcp-debug-server")
        .map_err(|e| io::Error::new(e.kind(), format!("listening on udp:{}: {e}", cli.listen)))?;
    socket.set_read_timeout(Some(STOP_CHECK))?;
    Ok(socket)
}

fn serve(cli: &Cli) -> io::Result<Totals> {
    let keys = FeedKeys::open(&cli.feed_key, "xtcp-debug-server")
        .map_err(|e| io::Error::other(format!("--feed-key: {e}")))?;
    let socket = open(cli)?;
    let shutdown = Shutdown::new()?;
    let signals = SignalThread::start(&shutdown)?;
    let totals = receive(cli, keys.as_ref(), &socket, &shutdown);
    signals.close();
    totals
}

/// Prints records until `shutdown` stops, then what is already queued.
fn receive(
    cli: &Cli,
    keys: Option<&FeedKeys>,
    socket: &UdpSocket,
    shutdown: &Shutdown,
) -> io::Result<Totals> {
    let mut totals = Totals::default();
    let mut watch = LossWatch::new(socket.try_clone()?, DEFAULT_RUN_LIMIT);
    let mut buf = vec![0u8; 65536];
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut draining = false;
    loop {
        if !draining && shutdown.is_stopping() {
            // Print what already arrived before exiting.
            draining = true;
            socket.set_nonblocking(true)?;
        }
        watch.tick();
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if draining && e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if nothing_yet(&e) => continue,
            Err(e) => return Err(e),
        };
        totals.datagrams += 1;
        totals.bytes += len as u64;
        let datagram = match keys {
            None => &buf[..len],
            Some(keys) => match keys.verify(&buf[..len]) {
                Some(payload) => payload,
                None => {
                    totals.unauthenticated += 1;
                    if totals.unauthenticated <= MAX_WARNINGS {
                        eprintln!("warning: datagram from {peer} without a valid feed key tag");
                    }
                    continue;
                }
            },
        };
        let records = if cli.format == Format::Count {
            count_records(datagram).map(|n| (n, Vec::new()))
        } else {
            decode_datagram(datagram).map(|records| (records.len() as u64, records))
        };
        let (count, records) = match records {
            Ok(got) => got,
            Err(e) => {
                totals.undecodable += 1;
                if totals.undecodable <= MAX_WARNINGS {
                    eprintln!("warning: undecodable datagram from {peer}: {e}");
                }
                continue;
            }
        };
        totals.records += count;
        if cli.format == Format::Count {
            watch.unread(count);
        } else {
            watch.records(records.iter().map(RecordId::from));
        }
        if matches!(cli.format, Format::None | Format::Count) {
            continue;
        }
        let written = records
            .iter()
            .try_for_each(|r| write_record(&mut out, r, cli.format))
            .and_then(|()| out.flush());
        match written {
            Ok(()) => {}
            // A reader that went away (`| head`) ends the server quietly.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e),
        }
    }
    totals.loss = watch.finish();
    Ok(totals)
}

fn write_record(out: &mut impl Write, r: &Record, format: Format) -> io::Result<()> {
    match format {
        Format::Json => serde_json::to_writer(&mut *out, r).map_err(io::Error::from)?,
        Format::Text => out.write_all(text_line(r).as_bytes())?,
        Format::None | Format::Count => return Ok(()),
    }
    out.write_all(b"\n")
}

fn endpoint(addr: &[u8], port: u32) -> String {
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
fn text_line(r: &Record) -> String {
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
    }
}
