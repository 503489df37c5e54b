//! `--sampling-modulus N`: keep one socket in N, the same ones on every poll.
//!
//! The choice is a function of the socket cookie (`inet_diag_sockid.
//! idiag_cookie`), which the kernel assigns once per socket and keeps for its
//! life, never of a socket's position in a dump. Cookies come from a counter,
//! so they are mixed first (splitmix64's finalizer): consecutive sockets, such
//! as the two ends of a loopback connection, do not fall into a pattern with
//! the modulus.

use crate::wire::inet_diag::InetDiagMsg;

#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    modulus: u64,
}

impl Sampler {
    /// `modulus` >= 1 (the CLI enforces it; 0 is read as 1).
    pub fn new(modulus: u64) -> Self {
        Sampler {
            modulus: modulus.max(1),
        }
    }

    pub fn keep(&self, cookie: u64) -> bool {
        self.modulus == 1 || mix(cookie) % self.modulus == 0
    }

    /// [`Self::keep`] for a socket message; one too short to hold its cookie
    /// is kept, so that decoding it fails and is counted.
    pub fn keep_message(&self, payload: &[u8]) -> bool {
        self.modulus == 1 || InetDiagMsg::new(payload).map_or(true, |m| self.keep(m.cookie()))
    }
}

/// A 64-bit finaliser (splitmix64's): every input bit moves every output
/// bit. Also the change tracker's hash.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_one_in_n_of_consecutive_cookies() {
        for n in [2u64, 3, 10, 100] {
            let s = Sampler::new(n);
            let kept = (1..=100_000u64).filter(|&c| s.keep(c)).count() as f64;
            let want = 100_000.0 / n as f64;
            assert!((kept - want).abs() < want * 0.1, "modulus {n}: kept {kept}");
        }
    }

    #[test]
    fn modulus_one_keeps_everything_and_choice_is_stable() {
        let all = Sampler::new(1);
        assert!((0..1000).all(|c| all.keep(c)));
        assert!(
            Sampler::new(3).keep_message(&[0; 8]),
            "short: kept, fails decode"
        );
        let s = Sampler::new(7);
        let first: Vec<bool> = (0..1000).map(|c| s.keep(c)).collect();
        let again: Vec<bool> = (0..1000).map(|c| s.keep(c)).collect();
        assert_eq!(first, again);
    }
}
