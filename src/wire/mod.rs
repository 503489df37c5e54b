//! Netlink `sock_diag` wire formats: I/O-free, allocation-free, panic-free.
//!
//! Everything here is a pure function of `&[u8]`: [`message::messages`] frames
//! a receive buffer, [`inet_diag::decode_socket`] turns one message into a
//! [`DiagSocket`] of borrowed views, and [`request::dump_request`] builds what
//! the poller sends. Runs in whichever thread holds the buffer. Integers are
//! host-endian except the ports and addresses of `inet_diag_sockid`.

pub mod bytecode;
mod bytes;
pub mod error;
pub mod inet_diag;
pub mod message;
pub mod request;
pub mod state;
pub mod tcp_info;

pub use error::WireError;
pub use inet_diag::{decode_socket, DiagSocket};
pub use tcp_info::{TailLayout, TcpInfo};
