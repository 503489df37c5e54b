//! `--dest stdout`: one JSON object per socket per line (proto field names,
//! addresses as IP strings), for people and for `jq`.

use std::io::{self, BufWriter, Stdout, Write};

use prost::Message;

use crate::proto::Record;

pub struct StdoutSink {
    out: BufWriter<Stdout>,
}

impl Default for StdoutSink {
    fn default() -> Self {
        StdoutSink {
            out: BufWriter::with_capacity(64 * 1024, io::stdout()),
        }
    }
}

impl StdoutSink {
    /// Prints one encoded `Record` as a JSON line.
    pub fn write(&mut self, encoded: &[u8]) -> io::Result<()> {
        let record = Record::decode(encoded).map_err(io::Error::other)?;
        serde_json::to_writer(&mut self.out, &record)?;
        self.out.write_all(b"\n")
    }

    /// Called at the end of each poll so a reader sees whole polls promptly.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
