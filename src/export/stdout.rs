//! `--dest stdout`: one JSON object per socket per line (proto field names,
//! addresses as IP strings), for people and for `jq`.

use std::io::{self, BufWriter, Stdout, Write};

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
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    /// Called at the end of each poll so a reader sees whole polls promptly.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
