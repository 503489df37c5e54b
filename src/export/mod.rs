//! From a decoded socket to bytes at a destination: [`record`] encodes the
//! protobuf `Record` with the [`encode`] writer; [`sink`] sends records to the
//! configured destination, [`udp`] (the feed's datagrams, `xtcp_feed`) or
//! [`stdout`] (JSON lines, or [`text`] lines like `ss`).

pub mod encode;
pub mod record;
pub mod sink;
pub mod stdout;
pub mod text;
pub mod udp;
