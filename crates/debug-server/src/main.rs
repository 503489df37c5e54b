//! `xtcp-debug-server`: receives the exporter's UDP datagrams and prints
//! every record, one JSON object per line (default) or, with `--format text`,
//! one `ss`-like line per socket. Undecodable datagrams are counted and
//! reported on stderr, never fatal. It tracks the numbers and watermarks of
//! each exporter run and reads its socket's drop counter, so its totals say
//! what never arrived, and it says when a run falls silent
//! (`xtcp_feed::sequence`). Each datagram's lines leave in one write. On
//! SIGINT/SIGTERM it prints what is
//! already queued on its socket, then its totals to stderr, and exits 0 (also
//! when stdout closes).

use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};
use xtcp::export::text::text_line;
use xtcp_feed::auth::{FeedKeyArgs, FeedKeys};
use xtcp_feed::datagram::{check_datagram, decode_datagram, Datagram};
use xtcp_feed::proto::Record;
use xtcp_feed::receiver::{bind_receiver, nothing_yet};
use xtcp_feed::sequence::{Loss, LossWatch, RecordId, DEFAULT_RUN_LIMIT};
use xtcp_service::cli::{parse_or_exit_with, Generate};
use xtcp_service::counters::{exit_line, Tally};
use xtcp_service::shutdown::{Shutdown, SignalThread};

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
    /// for benchmarks that still decodes every record, as a reader would).
    None,
    /// Like none, but check each record as the forwarder does, by walking
    /// its wire format without building it (the cheapest receiver, so it
    /// takes as little CPU as possible from what a benchmark measures).
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

    #[command(flatten)]
    generate: Generate,

    #[command(flatten)]
    feed_key: FeedKeyArgs,
}

xtcp_service::counters! {
    /// What the server received, for its exit line (it has no metrics).
    pub struct Totals;
    datagrams "Datagrams received.", exit "datagrams";
    bytes "Bytes of those datagrams.", exit "bytes";
    records "Records in the datagrams that were read.", exit "records";
    unauthenticated "Datagrams without a valid tag of a --feed-key.", exit "unauthenticated";
    undecodable "Datagrams that are not an exporter's.", exit "undecodable";
}

fn main() -> ExitCode {
    let cli = match parse_or_exit_with::<Cli>(
        FeedKeyArgs::with_env(Cli::command(), "XTCP_DEBUG_FEED_KEY"),
        |c| &c.generate,
    ) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match serve(&cli) {
        Ok((totals, loss)) => {
            xtcp_service::say!(
                "xtcp-debug-server: stopped:{}",
                exit_line(&[totals.exit_fields(), loss.exit_fields()])
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            xtcp_service::say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open(cli: &Cli) -> io::Result<UdpSocket> {
    let socket = bind_receiver(cli.listen, cli.recv_buffer, "xtcp-debug-server", false)
        .map_err(|e| io::Error::new(e.kind(), format!("listening on udp:{}: {e}", cli.listen)))?;
    socket.set_read_timeout(Some(STOP_CHECK))?;
    Ok(socket)
}

fn serve(cli: &Cli) -> io::Result<(Totals, Loss)> {
    let keys = FeedKeys::open(&cli.feed_key.paths(), "xtcp-debug-server")
        .map_err(|e| io::Error::other(format!("--feed-key: {e}")))?;
    let socket = open(cli)?;
    let shutdown = Shutdown::new();
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
) -> io::Result<(Totals, Loss)> {
    let mut totals = Totals::default();
    let mut watch = LossWatch::new(socket.try_clone()?, DEFAULT_RUN_LIMIT);
    let mut buf = vec![0u8; 65536];
    // Each datagram's lines are written at once, so a line never leaves in
    // two writes (a `BufWriter` splits where its buffer fills).
    let mut out = io::stdout().lock();
    let mut lines = Vec::new();
    // The run and number of each record of a datagram.
    let mut ids = Vec::new();
    let mut draining = false;
    loop {
        if !draining && shutdown.is_stopping() {
            // Print what already arrived before exiting.
            draining = true;
            socket.set_nonblocking(true)?;
        }
        watch.tick();
        watch.say_fell_silent("xtcp-debug-server");
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
                        xtcp_service::say!(
                            "warning: datagram from {peer} without a valid feed key tag"
                        );
                    }
                    continue;
                }
            },
        };
        let records = if cli.format == Format::Count {
            check_datagram(datagram, &mut ids, None).map(|d| match d {
                Datagram::Records(_) => Datagram::Records(Vec::new()),
                Datagram::Watermark(w) => Datagram::Watermark(w),
            })
        } else {
            decode_datagram(datagram).inspect(|d| {
                if let Datagram::Records(records) = d {
                    ids.clear();
                    ids.extend(records.iter().map(RecordId::from));
                }
            })
        };
        let records = match records {
            Ok(Datagram::Records(records)) => records,
            Ok(Datagram::Watermark(mark)) => {
                watch.watermark(&mark);
                continue;
            }
            Err(e) => {
                totals.undecodable += 1;
                if totals.undecodable <= MAX_WARNINGS {
                    xtcp_service::say!("warning: undecodable datagram from {peer}: {e}");
                }
                continue;
            }
        };
        totals.records += ids.len() as u64;
        watch.records(&ids);
        if matches!(cli.format, Format::None | Format::Count) {
            continue;
        }
        lines.clear();
        let written = records
            .iter()
            .try_for_each(|r| write_record(&mut lines, r, cli.format))
            .and_then(|()| out.write_all(&lines))
            .and_then(|()| out.flush());
        match written {
            Ok(()) => {}
            // A reader that went away (`| head`) ends the server quietly.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e),
        }
    }
    Ok((totals, watch.finish()))
}

fn write_record(out: &mut impl Write, r: &Record, format: Format) -> io::Result<()> {
    match format {
        Format::Json => serde_json::to_writer(&mut *out, r).map_err(io::Error::from)?,
        Format::Text => out.write_all(text_line(r).as_bytes())?,
        Format::None | Format::Count => return Ok(()),
    }
    out.write_all(b"\n")
}
