//! The `xtcp` command: parse the command line, run the pipeline, map the
//! outcome to an exit code (0 ok, 1 runtime error, 2 bad arguments, 3 a
//! `--once` poll or a `--replay` that lost or skipped anything).

use std::process::ExitCode;

use xtcp::config::{ArgsError, Config};
use xtcp::identity::Identity;
use xtcp_service::cli::exit_for;

fn main() -> ExitCode {
    let identity = match Identity::draw() {
        Ok(identity) => identity,
        Err(e) => {
            xtcp_service::say!("error: drawing the instance id: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        Err(ArgsError::Clap(e)) => return exit_for(&e),
        Err(ArgsError::PrintConfig(text)) => {
            // The instance is not configuration: each start draws its own.
            println!("{text}# this process: {identity} (every start draws a new instance)");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Invalid(line)) => {
            xtcp_service::say!("{line}");
            return ExitCode::from(2);
        }
    };
    let result = match &config.replay {
        Some(file) => xtcp::pipeline::replay::replay(&config, &identity, file),
        None => xtcp::pipeline::run(&config, &identity),
    };
    match result {
        Ok(totals) => {
            xtcp_service::say!("xtcp: stopped: {identity} {totals}");
            let by_hand = config.once || config.replay.is_some();
            if by_hand && totals.losses() > 0 {
                // The warning above said what; the status says it to a script.
                return ExitCode::from(3);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            xtcp_service::say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
