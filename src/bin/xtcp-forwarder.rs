//! The `xtcp-forwarder` command: UDP from the exporters into Kafka
//! (`xtcp::forwarder`). Exit 0 when stopped by SIGTERM/SIGINT, 1 when it
//! cannot start, 2 on a bad flag.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use xtcp::forwarder::{run, ForwarderConfig};

fn main() -> ExitCode {
    let config = match ForwarderConfig::try_parse() {
        Ok(config) => config,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            eprintln!(
                "{}",
                rendered.lines().next().unwrap_or("error: bad arguments")
            );
            return ExitCode::from(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            eprintln!("error: installing signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(&config, &stop) {
        Ok(totals) => {
            eprintln!("xtcp-forwarder: stopped: {totals}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
