//! An authenticated feed, for datagrams that cross a network.
//!
//! UDP takes datagrams from anyone who can reach the port, so a receiver
//! cannot tell an exporter's records from a forged or replayed-from-elsewhere
//! datagram by looking at them. With a shared key (`--feed-key FILE` on the
//! exporter and its receivers) every datagram ends in a tag: the first
//! [`TAG_LEN`] bytes of HMAC-SHA256(key, the rest of the datagram). A
//! receiver with keys passes on only datagrams whose tag one of its keys
//! (at most [`MAX_KEYS`], so a key can be rotated without a gap) made, and
//! counts the others. The tag proves who made a datagram, not that it is
//! new: a datagram replayed with a valid tag passes, and the receivers'
//! sequence tracking counts its records as duplicated.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the tag: half of SHA-256's 32, the truncation RFC 2104 allows
/// (128 bits: a forger's chance per datagram is 2^-128).
pub const TAG_LEN: usize = 16;

/// The shortest key accepted: SHA-256's output size (RFC 2104 advises no
/// less), e.g. 64 hex digits from `openssl rand -hex 32`.
pub const MIN_KEY_LEN: usize = 32;

/// Keys a receiver accepts at once: the current one and the next (or the
/// previous), for a rotation.
pub const MAX_KEYS: usize = 2;

/// One key, with SHA-256 already keyed (cloned per datagram, so the key is
/// not hashed again each time).
#[derive(Clone)]
pub struct FeedKey {
    mac: Hmac<Sha256>,
    /// Group or others may read the file: worth a warning.
    pub loosely_readable: bool,
}

impl fmt::Debug for FeedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FeedKey(..)")
    }
}

impl FeedKey {
    /// The key in `path`: the file's bytes, without trailing whitespace
    /// (the newline an editor or `echo` adds).
    pub fn load(path: &Path) -> Result<FeedKey, String> {
        let what = |e: std::io::Error| format!("reading the feed key {}: {e}", path.display());
        let mode = std::fs::metadata(path).map_err(what)?.permissions().mode();
        let bytes = std::fs::read(path).map_err(what)?;
        let key = bytes.trim_ascii_end();
        let mut key = FeedKey::new(key).map_err(|e| format!("{}: {e}", path.display()))?;
        key.loosely_readable = mode & 0o077 != 0;
        Ok(key)
    }

    /// [`Self::load`], with a warning prefixed with `program` when group
    /// or others may read the file.
    pub fn open(path: &Path, program: &str) -> Result<FeedKey, String> {
        let key = FeedKey::load(path)?;
        if key.loosely_readable {
            xtcp_service::say!(
                "{program}: warning: the feed key {} is readable by group or others",
                path.display()
            );
        }
        Ok(key)
    }

    pub fn new(key: &[u8]) -> Result<FeedKey, String> {
        if key.len() < MIN_KEY_LEN {
            return Err(format!(
                "a feed key of {} bytes is too short: use at least {MIN_KEY_LEN} (openssl rand -hex 32)",
                key.len()
            ));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| e.to_string())?;
        Ok(FeedKey {
            mac,
            loosely_readable: false,
        })
    }

    /// Appends the tag of `datagram` to it.
    pub fn sign(&self, datagram: &mut Vec<u8>) {
        let mut mac = self.mac.clone();
        mac.update(datagram);
        let tag = mac.finalize().into_bytes();
        datagram.extend_from_slice(&tag[..TAG_LEN]);
    }

    /// Whether `tag` is what this key makes for `payload` (in constant time).
    fn made(&self, payload: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(payload);
        mac.verify_truncated_left(tag).is_ok()
    }
}

/// The keys a receiver accepts.
#[derive(Debug, Clone)]
pub struct FeedKeys(Vec<FeedKey>);

/// A receiver's `--feed-key` (the forwarder's, the debug server's): the
/// flag every receiver spells the same way. Each names its environment
/// variable with [`Self::with_env`].
#[derive(Debug, Clone, clap::Args)]
pub struct FeedKeyArgs {
    /// Accept only datagrams signed with the key in this file (as the
    /// exporter's --feed-key); given twice, either key (for a rotation).
    #[arg(long = "feed-key", value_name = "FILE", value_delimiter = ',')]
    feed_key: Vec<PathBuf>,
}

impl FeedKeyArgs {
    /// `command` with `--feed-key` read from `var` too.
    pub fn with_env(command: clap::Command, var: &'static str) -> clap::Command {
        command.mut_arg("feed_key", |a| a.env(var))
    }

    /// The key files given; a blank one (`VAR=` in an environment file) is
    /// none.
    pub fn paths(&self) -> Vec<PathBuf> {
        let given = self.feed_key.iter().filter(|p| !p.as_os_str().is_empty());
        given.cloned().collect()
    }
}

impl FeedKeys {
    /// The keys in `paths`: `None` for none, else 1 to [`MAX_KEYS`] of
    /// them, opened as [`FeedKey::open`] does.
    pub fn open(paths: &[PathBuf], program: &str) -> Result<Option<FeedKeys>, String> {
        if paths.len() > MAX_KEYS {
            return Err(format!(
                "{} feed keys given: a receiver takes at most {MAX_KEYS}",
                paths.len()
            ));
        }
        if paths.is_empty() {
            return Ok(None);
        }
        paths
            .iter()
            .map(|p| FeedKey::open(p, program))
            .collect::<Result<_, _>>()
            .map(|keys| Some(FeedKeys(keys)))
    }

    /// The datagram without its tag, if one of the keys made the tag.
    pub fn verify<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let split = datagram.len().checked_sub(TAG_LEN)?;
        let (payload, tag) = datagram.split_at(split);
        self.0
            .iter()
            .any(|k| k.made(payload, tag))
            .then_some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(clap::Parser)]
    struct Receiver {
        #[command(flatten)]
        keys: FeedKeyArgs,
    }

    /// The flag each receiver shares: its own environment variable, a list
    /// or the flag twice.
    #[test]
    fn a_receivers_feed_key_flag_reads_its_own_variable() {
        let mut command = FeedKeyArgs::with_env(Receiver::command(), "XTCP_TEST_FEED_KEY");
        let arg = command.get_arguments().find(|a| a.get_id() == "feed_key");
        assert_eq!(
            arg.and_then(|a| a.get_env()),
            Some(std::ffi::OsStr::new("XTCP_TEST_FEED_KEY"))
        );
        let args = ["r", "--feed-key", "a,b", "--feed-key", "c"];
        let matches = command.try_get_matches_from_mut(args).unwrap();
        let parsed = Receiver::from_arg_matches(&matches).unwrap();
        let want = ["a", "b", "c"].map(PathBuf::from);
        assert_eq!(parsed.keys.paths(), want);
    }

    fn key(byte: u8) -> FeedKey {
        FeedKey::new(&[byte; MIN_KEY_LEN]).unwrap()
    }

    #[test]
    fn a_tag_passes_only_with_a_key_that_made_it() {
        let mut datagram = b"\x0a\x02\x08\x03".to_vec();
        key(1).sign(&mut datagram);
        assert_eq!(datagram.len(), 4 + TAG_LEN);
        let both = FeedKeys(vec![key(2), key(1)]);
        assert_eq!(both.verify(&datagram), Some(&b"\x0a\x02\x08\x03"[..]));
        // Another key's datagram, a changed byte, a cut tag, no tag.
        assert_eq!(FeedKeys(vec![key(2)]).verify(&datagram), None);
        let mut changed = datagram.clone();
        changed[1] ^= 1;
        assert_eq!(both.verify(&changed), None);
        assert_eq!(both.verify(&datagram[..datagram.len() - 1]), None);
        assert_eq!(both.verify(b"\x0a\x02\x08\x03"), None);
        assert_eq!(both.verify(&[]), None);
    }

    #[test]
    fn keys_are_long_enough_and_read_without_the_newline() {
        let short = FeedKey::new(&[7; MIN_KEY_LEN - 1]).unwrap_err();
        assert!(short.contains("too short"), "{short}");
        let dir = std::env::temp_dir().join(format!("xtcp-feed-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, [b"k".repeat(MIN_KEY_LEN), b"\n".to_vec()].concat()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = FeedKey::load(&path).unwrap();
        assert!(!loaded.loosely_readable);
        let mut a = b"x".to_vec();
        let mut b = a.clone();
        loaded.sign(&mut a);
        FeedKey::new(&b"k".repeat(MIN_KEY_LEN))
            .unwrap()
            .sign(&mut b);
        assert_eq!(a, b, "the newline is not part of the key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(FeedKey::load(&path).unwrap().loosely_readable);
        let missing = FeedKey::load(&dir.join("none")).unwrap_err();
        assert!(missing.starts_with("reading the feed key "), "{missing}");
        assert!(FeedKeys::open(&[path.clone(), path.clone(), path.clone()], "t").is_err());
        assert!(FeedKeys::open(&[], "t").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
