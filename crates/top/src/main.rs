//! `xtcp-top`: the host's TCP connections in a terminal, refreshed every
//! poll, busiest first. It runs the exporter's pipeline in process (the
//! same dump, decoding and records, no UDP) and shows each socket's
//! namespace, service (its pod, container, systemd unit or cgroup), state,
//! endpoints, congestion control, RTT, retransmits, bytes and the rate its
//! bytes moved since the poll before. Keys: `r` RTT, `t` retransmits, `b`
//! bytes, `d` rate (the default), `q` quits.

mod stderr;
mod view;

use std::io;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use crossbeam_channel::{bounded, Receiver};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::DefaultTerminal;
use xtcp::config::{ArgsError, Config};
use xtcp::export::sink::Output;
use xtcp::identity::Identity;
use xtcp::shutdown::Shutdown;
use xtcp_service::cli::{exit_for, parse_or_exit, parse_positive_duration, Generate};
use xtcp_service::shutdown::spawn;

use stderr::Captured;
use view::{SortKey, View};

/// A live view of the host's TCP connections.
#[derive(Debug, Parser)]
#[command(name = "xtcp-top", version, about, long_about = None)]
struct Cli {
    /// Time from one poll to the next.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    frequency: Duration,

    /// Show only the sockets this filter selects, in xtcp's --filter
    /// language (docs/filter.md), run by the kernel.
    #[arg(long)]
    filter: Option<String>,

    /// Show only the sockets whose service (as the SERVICE column shows it:
    /// pod UID, container id, systemd unit or cgroup path) contains TEXT.
    #[arg(long, value_name = "TEXT")]
    service: Option<String>,

    /// Show only sockets in these states (as xtcp's --states).
    #[arg(long)]
    states: Option<String>,

    /// Poll this network namespace (as xtcp's --netns; repeatable).
    #[arg(long)]
    netns: Vec<String>,

    /// Poll every network namespace of the host (as xtcp's --all-netns).
    #[arg(long)]
    all_netns: bool,

    /// The first sort; keys change it.
    #[arg(long, value_enum, default_value_t = SortKey::Rate)]
    sort: SortKey,

    #[command(flatten)]
    generate: Generate,
}

impl Cli {
    /// The exporter's configuration for these flags: one poll every
    /// --frequency, no metrics endpoint, no statsd.
    fn config(&self) -> Result<Config, ArgsError> {
        let mut args: Vec<String> = ["xtcp", "--no-prom", "--no-statsd", "--dest", "stdout"]
            .map(String::from)
            .into();
        args.push("--frequency".into());
        args.push(format!("{}ms", self.frequency.as_millis()));
        for (flag, value) in [("--filter", &self.filter), ("--states", &self.states)] {
            if let Some(value) = value {
                args.extend([flag.to_string(), value.clone()]);
            }
        }
        for netns in &self.netns {
            args.extend(["--netns".to_string(), netns.clone()]);
        }
        if self.all_netns {
            args.push("--all-netns".into());
        }
        Config::from_args(args)
    }
}

fn main() -> ExitCode {
    let cli = match parse_or_exit::<Cli>(|c| &c.generate) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config = match cli.config() {
        Ok(config) => config,
        Err(ArgsError::Clap(e)) => return exit_for(&e),
        Err(ArgsError::Invalid(line)) => {
            xtcp_service::say!("{line}");
            return ExitCode::from(2);
        }
        Err(ArgsError::PrintConfig(_) | ArgsError::Print(_)) => return ExitCode::SUCCESS,
    };
    match run(&cli, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            xtcp_service::say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The pipeline on its threads, the view on this one, until `q`.
fn run(cli: &Cli, config: &Config) -> Result<(), String> {
    let identity = Identity::draw().map_err(|e| format!("drawing the instance id: {e}"))?;
    let shutdown = Shutdown::new().map_err(|e| format!("creating the shutdown eventfd: {e}"))?;
    let (tx, rx) = bounded(256);
    let pipeline = {
        let (config, sd) = (config.clone(), shutdown.clone());
        spawn("pipeline".into(), &shutdown, move || {
            xtcp::pipeline::run_with(&config, &identity, &Output::Records(tx), &sd)
        })
        .map_err(|e| format!("starting the pipeline: {e}"))?
    };
    let captured = Captured::start().map_err(|e| format!("capturing stderr: {e}"))?;
    let mut terminal = ratatui::init();
    let shown = show(
        &mut terminal,
        &rx,
        View::new(cli.sort, cli.filter.clone(), cli.service.clone()),
        &captured,
        &shutdown,
    );
    ratatui::restore();
    let released = captured.finish();
    shutdown.stop();
    // The records still coming are dropped, which ends the pipeline.
    drop(rx);
    let result = pipeline
        .join()
        .map_err(|_| "the pipeline panicked".to_string())?;
    shown.map_err(|e| format!("drawing: {e}"))?;
    released.map_err(|e| format!("giving stderr back: {e}"))?;
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// How long a frame may spend taking records before it draws and reads
/// the keys.
const FRAME_WORK: Duration = Duration::from_millis(50);

/// Draws the view until `q`, or until the pipeline stops on its own.
fn show(
    terminal: &mut DefaultTerminal,
    records: &Receiver<Vec<Vec<u8>>>,
    mut view: View,
    said: &Captured,
    shutdown: &Shutdown,
) -> io::Result<()> {
    loop {
        // What is queued now, not what keeps coming, and for a frame's
        // time at most: a pipeline faster than the view (a loaded machine)
        // must not keep it from drawing and reading keys. What is left
        // waits in the channel, and the pipeline waits on it.
        let started = Instant::now();
        for batch in records.try_iter().take(records.len()) {
            view.add(&batch);
            if started.elapsed() >= FRAME_WORK {
                break;
            }
        }
        view.settle();
        view.said(said.latest());
        terminal.draw(|frame| view.draw(frame))?;
        if shutdown.is_stopping() {
            return Ok(());
        }
        if event::poll(Duration::from_millis(100))? {
            if let Event::Key(key) = event::read()? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                match key.code {
                    // Raw mode turns Ctrl-C into a key, not SIGINT.
                    _ if ctrl_c => return Ok(()),
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char(c) => view.key(c),
                    _ => {}
                }
            }
        }
    }
}
