//! The `xtcp-forwarder` command: UDP from the exporters into Kafka. Exit 0
//! when stopped by SIGTERM/SIGINT, 1 when it cannot start or fails, 2 on a
//! bad flag.

mod config;
mod forwarder;
mod metrics;
mod replay;
mod spool;

use std::process::ExitCode;

use xtcp_service::cli::exit_for;
use xtcp_service::shutdown::{Shutdown, SignalThread};

use config::{ForwarderConfig, Parsed};
use forwarder::run;

fn main() -> ExitCode {
    let config = match ForwarderConfig::from_args(std::env::args_os()) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => return exit_for(&e),
    };
    let shutdown = Shutdown::new();
    let signals = match SignalThread::start(&shutdown) {
        Ok(signals) => signals,
        Err(e) => {
            xtcp_service::say!("error: installing signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = run(&config, &shutdown);
    signals.close();
    match (result, shutdown.failure()) {
        (Err(e), _) => {
            xtcp_service::say!("error: {e}");
            ExitCode::FAILURE
        }
        (Ok(_), Some(reason)) => {
            xtcp_service::say!("error: {reason}");
            ExitCode::FAILURE
        }
        (Ok(totals), None) => {
            xtcp_service::say!("xtcp-forwarder: stopped: {totals}");
            ExitCode::SUCCESS
        }
    }
}
