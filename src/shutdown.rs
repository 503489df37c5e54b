//! The pipeline's side of a stop ([`xtcp_service::shutdown`]): besides the
//! program's [`Shutdown`](xtcp_service::shutdown::Shutdown), what its
//! threads block on and must be woken from:
//! - at an abort, a channel that disconnects, for the `select!` of a
//!   netlinker waiting for room in a full channel or a free buffer, and of
//!   the poller waiting for a dump's report;
//! - once no dump will start (or at an abort), an eventfd the netlinkers
//!   `poll(2)` next to their netlink socket, so an idle netlinker wakes at
//!   once.
//!
//! The stop itself: the poller starts no new poll, the poll in flight
//! finishes, then the netlinkers are released and the inetdiagers drain
//! their channels.

use std::io;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// The program's shutdown with the pipeline's wake-ups; it derefs to the
/// program's, for stop, abort and their state.
#[derive(Clone)]
pub struct Shutdown {
    program: xtcp_service::shutdown::Shutdown,
    /// Disconnects at an abort: nothing is ever sent.
    abort: Receiver<()>,
    release: Arc<EventFd>,
}

impl Shutdown {
    pub fn new() -> io::Result<Self> {
        let program = xtcp_service::shutdown::Shutdown::new();
        let (abort_tx, abort) = bounded(0);
        let release = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let released = Arc::clone(&release);
        program.on_abort(Box::new(move || {
            drop(abort_tx);
            release_now(&released);
        }));
        Ok(Shutdown {
            program,
            abort,
            release,
        })
    }

    /// Disconnects on abort only: for `select!`.
    pub fn abort_signal(&self) -> &Receiver<()> {
        &self.abort
    }

    /// Wakes the netlinkers for good: called once no dump will be started.
    pub fn release_netlinkers(&self) {
        release_now(&self.release);
    }

    /// The fd the netlinkers poll for release.
    pub fn release_fd(&self) -> BorrowedFd<'_> {
        self.release.as_fd()
    }
}

fn release_now(release: &EventFd) {
    // Only fails if the counter would overflow, which a few writes of 1 cannot do.
    let _ = release.write(1);
}

impl Deref for Shutdown {
    type Target = xtcp_service::shutdown::Shutdown;

    fn deref(&self) -> &Self::Target {
        &self.program
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_abort_disconnects_the_signal_and_releases_the_netlinkers() {
        let s = Shutdown::new().unwrap();
        let readable = |s: &Shutdown| {
            let mut fds = [nix::poll::PollFd::new(
                s.release_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut fds, 0u8).unwrap() == 1
        };
        s.stop();
        assert!(!readable(&s));
        assert_eq!(
            s.abort_signal().recv_timeout(Duration::ZERO),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        );
        s.clone().abort("test".into());
        assert!(readable(&s));
        assert_eq!(
            s.abort_signal().recv_timeout(Duration::ZERO),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
    }
}
