//! Talking to the kernel and running polls.
//!
//! - [`netlink`]: the `NETLINK_SOCK_DIAG` socket and the dump reader.
//! - [`poll`]: the poll loop: dump each family, decode, build records, write.

pub mod netlink;
pub mod poll;
