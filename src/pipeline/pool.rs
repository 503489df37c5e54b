//! A bounded pool of netlink receive buffers, one per family.
//!
//! Netlinkers take a buffer, `recv` into it and send it down the channel;
//! the inetdiager that walked it drops it, which puts it back. Buffers are
//! allocated on first use, never more than `capacity`, so memory is bounded
//! by `capacity x buffer length` and an idle host holds only what one poll
//! needed.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, select, Receiver, Sender};

pub struct BufferPool {
    free_tx: Sender<Vec<u8>>,
    free_rx: Receiver<Vec<u8>>,
    allocated: AtomicUsize,
    /// Buffers on loan now, and the most on loan at once since the last
    /// [`BufferPool::take_peak`]: how close a poll came to the capacity.
    in_use: AtomicUsize,
    peak: AtomicUsize,
    capacity: usize,
    buffer_len: usize,
}

impl BufferPool {
    pub fn new(capacity: usize, buffer_len: usize) -> Arc<Self> {
        let (free_tx, free_rx) = bounded(capacity);
        Arc::new(BufferPool {
            free_tx,
            free_rx,
            allocated: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            capacity,
            buffer_len,
        })
    }

    /// A buffer; `None` if `abort` disconnected first. Waits only if all
    /// `capacity` buffers are out, which the pipeline sizes the pool never
    /// to let happen.
    pub fn get(self: &Arc<Self>, abort: &Receiver<()>) -> Option<PooledBuf> {
        let buf = |buf| {
            let in_use = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
            self.peak.fetch_max(in_use, Ordering::Relaxed);
            PooledBuf {
                buf,
                pool: Arc::clone(self),
            }
        };
        if let Ok(b) = self.free_rx.try_recv() {
            return Some(buf(b));
        }
        let grew = self
            .allocated
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        if grew.is_ok() {
            return Some(buf(vec![0; self.buffer_len]));
        }
        select! {
            recv(self.free_rx) -> b => b.ok().map(buf),
            recv(abort) -> _ => None,
        }
    }

    /// Buffers allocated so far (at most the capacity): the receive memory
    /// this family has needed.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    pub fn buffer_len(&self) -> usize {
        self.buffer_len
    }

    /// The most buffers on loan at once since the last call; starts the
    /// next period from those on loan now.
    pub fn take_peak(&self) -> usize {
        self.peak
            .swap(self.in_use.load(Ordering::Relaxed), Ordering::Relaxed)
    }
}

/// A receive buffer on loan; dropping it returns it to its pool.
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
        // Cannot be full: the channel holds `capacity` and at most that many
        // buffers exist.
        let _ = self.pool.free_tx.try_send(std::mem::take(&mut self.buf));
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reused_and_abortable() {
        let pool = BufferPool::new(2, 64);
        let (abort_tx, abort) = bounded::<()>(0);
        let a = pool.get(&abort).unwrap();
        let b = pool.get(&abort).unwrap();
        assert_eq!((pool.allocated(), a.len()), (2, 64));
        drop(a);
        let c = pool.get(&abort).unwrap();
        assert_eq!(pool.allocated(), 2, "reused, not allocated");
        assert_eq!(pool.take_peak(), 2);
        // All in use: the next get waits, and gives up on abort.
        let t = std::thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.get(&abort).is_none()
        });
        drop(abort_tx);
        assert!(t.join().unwrap());
        drop((b, c));
        assert_eq!(pool.free_rx.len(), 2, "both back in the pool");
        assert_eq!(pool.take_peak(), 2, "the peak outlives the loans");
        assert_eq!(pool.take_peak(), 0, "a new period starts from none on loan");
    }
}
