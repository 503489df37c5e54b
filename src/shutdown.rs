//! Stopping the pipeline: one cloneable [`Shutdown`] handle, the signal
//! thread that trips it, and [`spawn`], which names worker threads and turns a
//! worker's panic into an abort of the whole pipeline instead of a hang.
//!
//! Two ways to stop:
//! - **stop** (first SIGINT/SIGTERM, `--max-loops` reached, stdout closed):
//!   the poller starts no new poll, the poll in flight finishes, then the
//!   netlinkers are released and the inetdiagers drain their channels;
//! - **abort** (a worker panicked, a second signal): everyone drops what they
//!   hold and exits now; the process exits 1 with the reason. After a second
//!   signal it does so within [`ABORT_GRACE`] even if a thread is stuck in a
//!   system call no signal ends (writing to a paused pipe reader).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    /// Dropped on stop: `stop_rx` then reports disconnection to every waiter.
    stop_tx: Mutex<Option<Sender<()>>>,
    stop_rx: Receiver<()>,
    abort_tx: Mutex<Option<Sender<()>>>,
    abort_rx: Receiver<()>,
    /// Readable once the netlinkers should exit; they `poll(2)` it next to
    /// their netlink socket, so an idle netlinker wakes at once.
    release: EventFd,
    failure: Mutex<Option<String>>,
}

impl Shutdown {
    pub fn new() -> io::Result<Self> {
        let (stop_tx, stop_rx) = bounded(0);
        let (abort_tx, abort_rx) = bounded(0);
        Ok(Shutdown {
            inner: Arc::new(Inner {
                stop_tx: Mutex::new(Some(stop_tx)),
                stop_rx,
                abort_tx: Mutex::new(Some(abort_tx)),
                abort_rx,
                release: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
                failure: Mutex::new(None),
            }),
        })
    }

    /// Asks for a graceful stop. Idempotent.
    pub fn stop(&self) {
        take(&self.inner.stop_tx);
    }

    /// Stops everything now; `reason` becomes the process's error. The first
    /// reason wins.
    pub fn abort(&self, reason: String) {
        lock(&self.inner.failure).get_or_insert(reason);
        self.stop();
        take(&self.inner.abort_tx);
        self.release_netlinkers();
    }

    /// Wakes the netlinkers for good: called once no dump will be started.
    pub fn release_netlinkers(&self) {
        // Only fails if the counter would overflow, which a few writes of 1 cannot do.
        let _ = self.inner.release.write(1);
    }

    pub fn is_stopping(&self) -> bool {
        is_disconnected(&self.inner.stop_rx)
    }

    /// Disconnects on stop or abort: for `select!` and `recv_timeout`.
    pub fn stop_signal(&self) -> &Receiver<()> {
        &self.inner.stop_rx
    }

    /// Disconnects on abort only.
    pub fn abort_signal(&self) -> &Receiver<()> {
        &self.inner.abort_rx
    }

    pub fn is_aborted(&self) -> bool {
        is_disconnected(&self.inner.abort_rx)
    }

    /// The fd the netlinkers poll for release.
    pub fn release_fd(&self) -> BorrowedFd<'_> {
        self.inner.release.as_fd()
    }

    /// Why the pipeline was aborted, if it was.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.failure).clone()
    }
}

fn is_disconnected(rx: &Receiver<()>) -> bool {
    matches!(
        rx.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

fn take(slot: &Mutex<Option<Sender<()>>>) {
    drop(lock(slot).take());
}

/// A poisoned lock only means another thread panicked while holding it; the
/// data (an `Option`) is still consistent, and that panic is reported anyway.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawns a named worker. If it panics, the pipeline is aborted so the other
/// threads stop instead of waiting on it forever.
pub fn spawn<F, T>(name: String, shutdown: &Shutdown, work: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let guard = PanicGuard {
        shutdown: shutdown.clone(),
        name: name.clone(),
    };
    thread::Builder::new().name(name).spawn(move || {
        let _guard = guard;
        work()
    })
}

struct PanicGuard {
    shutdown: Shutdown,
    name: String,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if thread::panicking() {
            self.shutdown
                .abort(format!("thread {} panicked (message above)", self.name));
        }
    }
}

/// How long an abort may take before the process exits anyway: a thread
/// blocked in a system call that no signal ends (a `write(2)` to a paused
/// `less`) would otherwise keep it alive until SIGKILL.
pub const ABORT_GRACE: Duration = Duration::from_millis(800);

/// The thread turning SIGINT/SIGTERM into [`Shutdown::stop`], and a second
/// signal into [`Shutdown::abort`]; if the process is still running
/// [`ABORT_GRACE`] after that, it exits 1 with the reason.
pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl SignalThread {
    pub fn start(shutdown: &Shutdown) -> io::Result<Self> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let shutdown = shutdown.clone();
        let thread = spawn("signals".into(), &shutdown.clone(), move || {
            for signal in signals.forever() {
                if shutdown.is_stopping() {
                    shutdown.abort(format!(
                        "second signal ({signal}) while stopping: exited without draining"
                    ));
                    exit_after_grace(&shutdown);
                } else {
                    shutdown.stop();
                }
            }
        })?;
        Ok(SignalThread { handle, thread })
    }

    /// Unregisters the handler and joins the thread.
    pub fn close(self) {
        self.handle.close();
        // The loop above cannot panic; a join error would already be in `failure`.
        let _ = self.thread.join();
    }
}

/// Exits the process with status 1 once [`ABORT_GRACE`] has passed, unless
/// it has ended by then (the normal case: every thread saw the abort).
fn exit_after_grace(shutdown: &Shutdown) {
    let shutdown = shutdown.clone();
    // Detached: the process ends first, or this ends it.
    let _ = thread::Builder::new()
        .name("abort-grace".into())
        .spawn(move || {
            thread::sleep(ABORT_GRACE);
            let reason = shutdown.failure().unwrap_or_default();
            crate::say!("error: {reason} (a thread was still blocked after {ABORT_GRACE:?})");
            std::process::exit(1);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_disconnects_stop_signal_only() {
        let s = Shutdown::new().unwrap();
        assert!(!s.is_stopping());
        s.clone().stop();
        assert!(s.is_stopping());
        assert!(!s.is_aborted());
        assert!(s.failure().is_none());
        assert!(s.stop_signal().recv_timeout(Duration::ZERO).is_err());
    }

    #[test]
    fn a_worker_panic_aborts_with_its_name() {
        let s = Shutdown::new().unwrap();
        let waiter = {
            let s = s.clone();
            spawn("waiter".into(), &s.clone(), move || {
                // Blocks until the abort: this is what would hang without the guard.
                let _ = s.abort_signal().recv();
            })
            .unwrap()
        };
        let panicker = spawn("inetdiager-v4-0".into(), &s, || panic!("boom")).unwrap();
        assert!(panicker.join().is_err());
        waiter.join().unwrap();
        assert!(s.is_aborted() && s.is_stopping());
        let failure = s.failure().unwrap();
        assert!(failure.contains("inetdiager-v4-0"), "{failure}");
        // The release fd is readable for the netlinkers.
        let mut fds = [nix::poll::PollFd::new(
            s.release_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(nix::poll::poll(&mut fds, 0u8).unwrap(), 1);
    }
}
