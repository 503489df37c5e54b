//! The pipeline's stderr lines while the view is up.
//!
//! In raw mode a line written to the terminal lands wherever the cursor is
//! and stays there until that cell is drawn again: a warning of the
//! pipeline (a long poll) would be drawn over the view, and shift it. So
//! while the view is up, fd 2 is a pipe: a thread keeps what comes through
//! it, the view shows the latest line, and once the terminal is restored
//! the kept lines are written to the real stderr.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::fcntl::OFlag;
use nix::unistd::{dup, dup2_stderr, pipe2};

/// Lines kept for the real stderr: the last ones, with a count of the
/// earlier ones left out (a long poll warns at every poll).
const KEPT: usize = 100;

#[derive(Default)]
struct Lines {
    kept: VecDeque<String>,
    left_out: u64,
}

pub struct Captured {
    /// The real stderr.
    saved: OwnedFd,
    lines: Arc<Mutex<Lines>>,
    reader: JoinHandle<()>,
}

impl Captured {
    /// Points fd 2 at a pipe read by a thread of its own.
    pub fn start() -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        let saved = dup(io::stderr())?;
        dup2_stderr(&write)?;
        // fd 2 is now the pipe's only writer: restoring it ends the reader.
        drop(write);
        let lines = Arc::new(Mutex::new(Lines::default()));
        let reader = std::thread::Builder::new().name("stderr".into()).spawn({
            let lines = Arc::clone(&lines);
            move || {
                for line in BufReader::new(File::from(read)).lines() {
                    let Ok(line) = line else { return };
                    let mut lines = lock(&lines);
                    if lines.kept.len() == KEPT {
                        lines.kept.pop_front();
                        lines.left_out += 1;
                    }
                    lines.kept.push_back(line);
                }
            }
        })?;
        Ok(Captured {
            saved,
            lines,
            reader,
        })
    }

    /// The last line said, if any.
    pub fn latest(&self) -> Option<String> {
        lock(&self.lines).kept.back().cloned()
    }

    /// Gives fd 2 back and writes there the lines said meanwhile.
    pub fn finish(self) -> io::Result<()> {
        dup2_stderr(&self.saved)?;
        // The reader has read everything once the pipe has no writer.
        let _ = self.reader.join();
        let lines = std::mem::take(&mut *lock(&self.lines));
        if lines.left_out > 0 {
            xtcp_service::say!(
                "xtcp-top: {} earlier lines on stderr left out; the last {}:",
                lines.left_out,
                lines.kept.len()
            );
        }
        lines
            .kept
            .iter()
            .for_each(|line| xtcp_service::say!("{line}"));
        Ok(())
    }
}

/// A poisoned lock only means the reader panicked between two lines.
fn lock(lines: &Mutex<Lines>) -> MutexGuard<'_, Lines> {
    lines.lock().unwrap_or_else(|e| e.into_inner())
}
