//! The destination an inetdiager writes records to (`--dest`).

use std::io;

use crate::config::{Config, Dest};
use crate::export::auth::FeedKey;
use crate::export::stdout::StdoutSink;
use crate::export::udp::{SendTally, UdpSink};

pub enum Sink {
    Udp(UdpSink),
    Stdout(StdoutSink),
}

impl Sink {
    /// The destination of `config`; `key` signs UDP datagrams (stdout has
    /// none to sign).
    pub fn open(config: &Config, key: Option<FeedKey>) -> io::Result<Sink> {
        Ok(match config.dest {
            Dest::Udp(addr) => Sink::Udp(UdpSink::connect(addr, config.udp_batch_bytes, key)?),
            Dest::Stdout => Sink::Stdout(StdoutSink::new(config.format)),
        })
    }

    /// Takes one encoded record. Only stdout fails here (a closed pipe, a
    /// full disk); UDP errors are counted in the tally.
    pub fn record(&mut self, record: &[u8]) -> io::Result<()> {
        match self {
            Sink::Udp(udp) => {
                udp.record(record);
                Ok(())
            }
            Sink::Stdout(out) => out.write(record),
        }
    }

    /// Sends what is pending: called after each netlink buffer.
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Udp(udp) => {
                udp.flush();
                Ok(())
            }
            Sink::Stdout(out) => out.flush(),
        }
    }

    pub fn take_tally(&mut self) -> SendTally {
        match self {
            Sink::Udp(udp) => udp.take_tally(),
            Sink::Stdout(out) => {
                let (datagrams, bytes) = out.take_tally();
                SendTally {
                    datagrams,
                    bytes,
                    ..SendTally::default()
                }
            }
        }
    }
}
