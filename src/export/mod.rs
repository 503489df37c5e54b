//! From a decoded socket to bytes at a destination: [`record`] encodes the
//! protobuf `Record` with the [`encode`] writer; [`sink`] sends records to the
//! configured destination, [`udp`] (protobuf datagrams, and their decoding
//! for receivers) or [`stdout`] (JSON lines via [`json`]); [`check`] is how
//! receivers check a record without building it, [`sequence`] how they tell
//! what never arrived.

pub mod auth;
pub mod check;
pub mod encode;
pub mod json;
pub mod record;
pub mod sequence;
pub mod sink;
pub mod stdout;
pub mod text;
pub mod udp;
