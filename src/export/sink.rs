//! The destination an inetdiager writes records to (`--dest`), or, for a
//! program that shows the records itself (`xtcp-top`), a channel.

use std::io;

use crossbeam_channel::Sender;

use crate::config::{Config, Dest};
use crate::export::stdout::StdoutSink;
use crate::export::udp::{SendTally, UdpSink};
use xtcp_feed::auth::FeedKey;

pub enum Sink {
    Udp(UdpSink),
    Stdout(StdoutSink),
    Records(RecordsSink),
}

/// Where a pipeline's records go.
#[derive(Debug, Clone)]
pub enum Output {
    /// `--dest` of the configuration.
    Configured,
    /// Each flush (one netlink buffer's records) as a batch of encoded
    /// `Record`s, in process.
    Records(Sender<Vec<Vec<u8>>>),
}

/// [`Output::Records`]: the records of one flush, gathered.
pub struct RecordsSink {
    tx: Sender<Vec<Vec<u8>>>,
    batch: Vec<Vec<u8>>,
    batches: u64,
    bytes: u64,
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

    /// The sink `output` names.
    pub fn for_output(output: &Output, config: &Config, key: Option<FeedKey>) -> io::Result<Sink> {
        match output {
            Output::Configured => Sink::open(config, key),
            Output::Records(tx) => Ok(Sink::Records(RecordsSink {
                tx: tx.clone(),
                batch: Vec::new(),
                batches: 0,
                bytes: 0,
            })),
        }
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
            Sink::Records(r) => {
                r.bytes += record.len() as u64;
                r.batch.push(record.to_vec());
                Ok(())
            }
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
            Sink::Records(r) if r.batch.is_empty() => Ok(()),
            Sink::Records(r) => {
                r.batches += 1;
                // The reader gone is a closed output, like stdout's pipe.
                r.tx.send(std::mem::take(&mut r.batch))
                    .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
            }
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
            Sink::Records(r) => SendTally {
                datagrams: std::mem::take(&mut r.batches),
                bytes: std::mem::take(&mut r.bytes),
                ..SendTally::default()
            },
        }
    }
}
