//! A value the record-writing threads read on every record without taking
//! a lock: it is replaced whole, and each thread keeps an `Arc` of the one it
//! last saw, noticing a newer one with one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Published<T> {
    value: Mutex<Arc<T>>,
    generation: AtomicU64,
}

impl<T> Published<T> {
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.value.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, value: T) {
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
        self.generation.fetch_add(1, Relaxed);
    }

    pub fn reader(&self) -> Reader<T> {
        Reader {
            generation: self.generation.load(Relaxed),
            value: self.current(),
        }
    }
}

/// One thread's copy of a [`Published`] value.
pub struct Reader<T> {
    value: Arc<T>,
    generation: u64,
}

impl<T> Reader<T> {
    /// Takes `published`'s value if it is newer than the one held.
    pub fn refresh(&mut self, published: &Published<T>) {
        let generation = published.generation.load(Relaxed);
        if generation != self.generation {
            self.value = published.current();
            self.generation = generation;
        }
    }
}

impl<T> std::ops::Deref for Reader<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}
