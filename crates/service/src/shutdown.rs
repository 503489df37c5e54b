//! Stopping a program: one cloneable [`Shutdown`] handle, the signal thread
//! that trips it, and [`spawn`], which names worker threads and turns a
//! worker's panic into an abort of the whole program instead of a hang.
//!
//! Two ways to stop:
//! - **stop** (first SIGINT/SIGTERM, or the program's own end such as the
//!   exporter's `--max-loops`): no new work starts, the work in flight
//!   finishes and what is queued is drained;
//! - **abort** (a worker panicked, a second signal): everyone drops what they
//!   hold and exits now; the process exits 1 with the reason. After a second
//!   signal it does so within [`ABORT_GRACE`] even if a thread is stuck in a
//!   system call no signal ends (writing to a paused pipe reader).
//!
//! Threads that loop check [`Shutdown::is_stopping`]; threads that block on
//! something else are woken by a [`Hook`] their program registers (the
//! exporter disconnects a channel its threads `select!` on).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

/// What runs once at a stop or an abort: how a program wakes what its
/// threads block on (a channel to disconnect, an fd to make readable).
pub type Hook = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    /// Read on every loop of a busy thread: a load, no lock.
    stopping: AtomicBool,
    aborted: AtomicBool,
    state: Mutex<State>,
    /// Notified at the stop, for [`Shutdown::wait_stop`].
    stopped: Condvar,
}

#[derive(Default)]
struct State {
    failure: Option<String>,
    on_stop: Vec<Hook>,
    on_abort: Vec<Hook>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            inner: Arc::new(Inner {
                stopping: AtomicBool::new(false),
                aborted: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                stopped: Condvar::new(),
            }),
        }
    }

    /// Asks for a graceful stop. Idempotent.
    pub fn stop(&self) {
        let hooks = {
            let mut state = lock(&self.inner.state);
            self.inner.stopping.store(true, Ordering::SeqCst);
            std::mem::take(&mut state.on_stop)
        };
        self.inner.stopped.notify_all();
        hooks.into_iter().for_each(|hook| hook());
    }

    /// Stops everything now; `reason` becomes the process's error. The first
    /// reason wins.
    pub fn abort(&self, reason: String) {
        lock(&self.inner.state).failure.get_or_insert(reason);
        self.stop();
        let hooks = {
            let mut state = lock(&self.inner.state);
            self.inner.aborted.store(true, Ordering::SeqCst);
            std::mem::take(&mut state.on_abort)
        };
        hooks.into_iter().for_each(|hook| hook());
    }

    /// Runs `hook` at the stop (or an abort), or now if that has come.
    pub fn on_stop(&self, hook: Hook) {
        self.add_hook(hook, Self::is_stopping, |s| &mut s.on_stop);
    }

    /// Runs `hook` at an abort, or now if one has come.
    pub fn on_abort(&self, hook: Hook) {
        self.add_hook(hook, Self::is_aborted, |s| &mut s.on_abort);
    }

    /// Keeps `hook` in the list `hooks` picks, or runs it now when `come`
    /// says its moment has come (checked under the lock the moment's own
    /// run of the list takes, so a hook is never missed).
    fn add_hook(
        &self,
        hook: Hook,
        come: fn(&Self) -> bool,
        hooks: fn(&mut State) -> &mut Vec<Hook>,
    ) {
        let mut state = lock(&self.inner.state);
        if come(self) {
            drop(state);
            hook();
        } else {
            hooks(&mut state).push(hook);
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the stop (or an abort): `true` if it came.
    pub fn wait_stop(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.inner.state);
        while !self.is_stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .inner
                .stopped
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Why the program was aborted, if it was.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.state).failure.clone()
    }
}

/// A poisoned lock only means another thread panicked while holding it; the
/// state is still consistent (flags and lists), and that panic is reported
/// anyway.
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
    use std::sync::mpsc;

    #[test]
    fn stop_runs_the_stop_hooks_only() {
        let s = Shutdown::new();
        let (tx, rx) = mpsc::channel();
        let (stop_tx, abort_tx) = (tx.clone(), tx);
        s.on_stop(Box::new(move || stop_tx.send("stop").unwrap()));
        s.on_abort(Box::new(move || abort_tx.send("abort").unwrap()));
        assert!(!s.is_stopping() && !s.wait_stop(Duration::from_millis(1)));
        s.clone().stop();
        s.stop();
        assert!(s.is_stopping() && s.wait_stop(Duration::ZERO));
        assert!(!s.is_aborted());
        assert!(s.failure().is_none());
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["stop"]);
        // Registered late: run at once.
        let (late_tx, late_rx) = mpsc::channel();
        s.on_stop(Box::new(move || late_tx.send(()).unwrap()));
        assert!(late_rx.try_recv().is_ok());
    }

    #[test]
    fn a_worker_panic_aborts_with_its_name() {
        let s = Shutdown::new();
        let (tx, rx) = mpsc::channel::<()>();
        // Dropping the sender at the abort wakes the waiter.
        s.on_abort(Box::new(move || drop(tx)));
        let waiter = spawn("waiter".into(), &s, move || {
            // Blocks until the abort: this is what would hang without the guard.
            let _ = rx.recv();
        })
        .unwrap();
        let panicker = spawn("inetdiager-v4-0".into(), &s, || panic!("boom")).unwrap();
        assert!(panicker.join().is_err());
        waiter.join().unwrap();
        assert!(s.is_aborted() && s.is_stopping());
        let failure = s.failure().unwrap();
        assert!(failure.contains("inetdiager-v4-0"), "{failure}");
    }

    #[test]
    fn a_waiter_wakes_at_the_stop() {
        let s = Shutdown::new();
        let waiter = {
            let s = s.clone();
            thread::spawn(move || s.wait_stop(Duration::from_secs(3600)))
        };
        s.stop();
        assert!(waiter.join().unwrap());
    }
}
