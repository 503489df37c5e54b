//! What every xtcp program (the exporter, the forwarder, the debug server)
//! does the same way with its command line: clap's errors become one line and
//! exit 2, `--help`/`--version` print and exit 0, and durations and integer
//! ranges read the same.

use std::process::ExitCode;
use std::time::Duration;

/// How a program ends when clap did not return its arguments: `--help` and
/// `--version` are printed (exit 0); an error is printed as its first line
/// only, without clap's usage block, so a log holds one line (exit 2).
pub fn exit_for(e: &clap::Error) -> ExitCode {
    if e.use_stderr() {
        crate::say!("{}", first_line(&e.render().to_string()));
        ExitCode::from(2)
    } else {
        let _ = e.print();
        ExitCode::SUCCESS
    }
}

/// The first line of a multi-line message.
pub fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string()
}

/// `--man` and `--completions SHELL`: hidden flags every program has, for
/// its package (`make deb`): the man page (roff) or a shell's completion
/// script, made from the program's clap definition.
#[derive(Debug, Clone, clap::Args)]
pub struct Generate {
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    man: bool,
    /// Print the completion script for SHELL (bash, zsh, fish...) and exit.
    #[arg(long, hide = true, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
}

impl Generate {
    /// The text asked for, if any, made from `cmd`, the program's command.
    pub fn text(&self, mut cmd: clap::Command) -> Option<String> {
        let mut out = Vec::new();
        if self.man {
            clap_mangen::Man::new(cmd).render(&mut out).ok()?;
        } else {
            let name = cmd.get_name().to_string();
            clap_complete::generate(self.completions?, &mut cmd, name, &mut out);
        }
        String::from_utf8(out).ok()
    }
}

/// Parses this process's command line into `C`, or ends the program at
/// once: `--help` and `--version`, a bad flag (one line, exit 2), and
/// `--man` and `--completions` of its `Generate` (found by `generate`),
/// printed.
pub fn parse_or_exit<C: clap::Parser + clap::CommandFactory>(
    generate: impl Fn(&C) -> &Generate,
) -> Result<C, ExitCode> {
    parse_or_exit_with(C::command(), generate)
}

/// [`parse_or_exit`] with `command`, `C`'s own changed at run time (such as
/// an environment variable named by the program, `FeedKeyArgs::with_env`).
pub fn parse_or_exit_with<C: clap::FromArgMatches>(
    mut command: clap::Command,
    generate: impl Fn(&C) -> &Generate,
) -> Result<C, ExitCode> {
    let cli = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|m| C::from_arg_matches(&m))
        .map_err(|e| exit_for(&e.format(&mut command)))?;
    if let Some(text) = generate(&cli).text(command) {
        print!("{text}");
        return Err(ExitCode::SUCCESS);
    }
    Ok(cli)
}

/// A duration flag such as `30s`, `500ms` or `1m 30s`; zero is allowed
/// (e.g. a linger of `0ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}': {e} (e.g. 30s, 500ms, 1m)"))
}

/// A duration flag that must be longer than zero (a period or a timeout).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("'{s}' must be longer than zero"));
    }
    Ok(d)
}

/// An integer flag with an inclusive range.
pub fn ranged(lo: u64, hi: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s| {
        let v: u64 = s.parse().map_err(|e| format!("'{s}': {e}"))?;
        if !(lo..=hi).contains(&v) {
            return Err(format!("{v} is outside {lo}..={hi}"));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
        assert_eq!(
            parse_positive_duration("1m 500ms"),
            Ok(Duration::from_millis(60_500))
        );
        assert!(parse_positive_duration("0s")
            .unwrap_err()
            .contains("longer than zero"));
        assert!(parse_duration("soon").unwrap_err().contains("e.g. 30s"));
    }

    #[test]
    fn errors_are_one_line() {
        #[derive(clap::Parser, Debug)]
        struct Args {
            #[arg(long)]
            n: u32,
        }
        let e = <Args as clap::Parser>::try_parse_from(["p", "--n", "x"]).unwrap_err();
        let line = first_line(&e.render().to_string());
        assert!(line.starts_with("error:") && line.contains("--n"), "{line}");
        assert_eq!(exit_for(&e), ExitCode::from(2));
    }
}
