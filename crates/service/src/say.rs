//! Lines on stderr, each in one `write(2)`.
//!
//! Rust's stderr is unbuffered: `eprintln!` hands each formatted piece to
//! the kernel as it comes, so a poll line leaves in two writes and the exit
//! line in dozens, and another program writing to the same terminal or pipe
//! (`make run`: the debug server's records) lands in the middle of them.
//! [`say!`](crate::say) formats the whole line first and writes it at once.
//! Every xtcp program prints its stderr lines through it (`clippy.toml`
//! refuses `eprintln!`); a write of a line up to `PIPE_BUF` (4096) bytes to a
//! pipe is never split or interleaved (pipe(7)).

use std::fmt::{self, Write as _};
use std::io::Write as _;

/// Writes one line (`format!` arguments, without the newline) to stderr in
/// one `write(2)`. A stderr that cannot be written to is ignored, as
/// `eprintln!` would panic over it and nothing else can be told.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say::line(format_args!($($arg)*))
    };
}

/// What [`say!`](crate::say) calls.
pub fn line(args: fmt::Arguments<'_>) {
    let mut text = String::with_capacity(160);
    let _ = text.write_fmt(args);
    text.push('\n');
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
