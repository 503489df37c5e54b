//! `--dest stdout`: one JSON object per socket per line (proto field names,
//! addresses as IP strings), for people and for `jq`; or, with `--format
//! text`, one `ss`-like line ([`crate::export::text`]).
//!
//! Each inetdiager gathers the lines of one netlink buffer and writes them
//! under the stdout lock, so lines from several threads never interleave.
//! The JSON is made by decoding the exported protobuf bytes, so it shows
//! exactly what would go on the wire.

use std::io::{self, Write};

use prost::Message;

use crate::config::OutputFormat;
use crate::export::text::text_line;
use xtcp_feed::proto::Record;

pub struct StdoutSink {
    format: OutputFormat,
    lines: Vec<u8>,
    written: u64,
    flushes: u64,
}

impl StdoutSink {
    pub fn new(format: OutputFormat) -> Self {
        StdoutSink {
            format,
            lines: Vec::new(),
            written: 0,
            flushes: 0,
        }
    }

    /// Adds one encoded `Record` as a line of the format.
    pub fn write(&mut self, encoded: &[u8]) -> io::Result<()> {
        let record = Record::decode(encoded).map_err(io::Error::other)?;
        match self.format {
            OutputFormat::Json => serde_json::to_writer(&mut self.lines, &record)?,
            OutputFormat::Text => self.lines.extend_from_slice(text_line(&record).as_bytes()),
        }
        self.lines.push(b'\n');
        Ok(())
    }

    /// Writes the gathered lines.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let mut out = io::stdout().lock();
        out.write_all(&self.lines)?;
        out.flush()?;
        self.written += self.lines.len() as u64;
        self.flushes += 1;
        self.lines.clear();
        Ok(())
    }

    /// `(writes, bytes)` since the last call.
    pub fn take_tally(&mut self) -> (u64, u64) {
        let t = (self.flushes, self.written);
        (self.flushes, self.written) = (0, 0);
        t
    }
}
