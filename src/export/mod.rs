//! From a decoded socket to bytes at a destination: [`record`] fills the
//! protobuf record, [`encode`] backs its fast encoder, [`json`] prints it, [`stdout`] is the one-line-per-socket
//! destination.

pub mod encode;
pub mod json;
pub mod record;
pub mod stdout;
