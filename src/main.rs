//! The `xtcp` command: parse the command line, run the pipeline, map the
//! outcome to an exit code (0 ok, 1 runtime error, 2 bad arguments).

use std::process::ExitCode;

use xtcp::cli::exit_for;
use xtcp::config::{ArgsError, Config};

fn main() -> ExitCode {
    let config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        Err(ArgsError::Clap(e)) => return exit_for(&e),
        Err(ArgsError::PrintConfig(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Invalid(line)) => {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    match xtcp::pipeline::run(&config) {
        Ok(totals) => {
            eprintln!("xtcp: stopped: {totals}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
