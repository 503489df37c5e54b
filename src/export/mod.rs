//! From a decoded socket to bytes at a destination: [`record`] encodes the
//! protobuf `Record` with the [`encode`] writer; [`json`] and [`stdout`] print
//! decoded records one JSON object per line.

pub mod encode;
pub mod json;
pub mod record;
pub mod stdout;
