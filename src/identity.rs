//! Who made a record: the host's name and this exporter process's instance.
//!
//! `record_counter` starts at 1 in every process, so the hostname alone does
//! not tell two runs (a restart, or two exporters sharing a hostname) apart.
//! The instance is a random 64-bit number drawn from the kernel at start;
//! `(hostname, instance, record_counter)` names one record for good. Two runs
//! draw the same instance with probability 2^-64 per pair.

use std::fmt;
use std::io;

/// The identity stamped on every record, the exit line and
/// `xtcp_instance_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub hostname: String,
    /// Never 0: a record without the field (schema 2 or older) reads as 0.
    pub instance: u64,
}

impl Identity {
    pub fn new(hostname: impl Into<String>, instance: u64) -> Self {
        Identity {
            hostname: hostname.into(),
            instance,
        }
    }

    /// This host's name and a fresh instance from `getrandom(2)`.
    pub fn draw() -> io::Result<Self> {
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .map_err(io::Error::from)?;
        loop {
            let mut bytes = [0u8; 8];
            // SAFETY: the kernel writes at most `bytes.len()` bytes into it.
            let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let instance = u64::from_ne_bytes(bytes);
            // A short read (never for 8 bytes) or a draw of 0 draws again.
            if n as usize == bytes.len() && instance != 0 {
                return Ok(Identity { hostname, instance });
            }
        }
    }
}

impl fmt::Display for Identity {
    /// `hostname web-1 instance 1234`: the words of the exit line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hostname {} instance {}", self.hostname, self.instance)
    }
}

#[cfg(test)]
mod tests {
    use super::Identity;

    #[test]
    fn each_draw_is_a_new_instance() {
        let a = Identity::draw().unwrap();
        let b = Identity::draw().unwrap();
        assert_eq!(a.hostname, b.hostname);
        assert_ne!(a.instance, 0);
        assert_ne!(a.instance, b.instance);
        assert_eq!(Identity::new("h", 7).to_string(), "hostname h instance 7");
    }
}
