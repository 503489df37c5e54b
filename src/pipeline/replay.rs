//! `--replay FILE`: decodes a dump file (one `--capture` wrote, or `ss -D`:
//! the format is in [`crate::pipeline::capture`]) instead of asking the
//! kernel. Its socket messages go through the same sampling, decoding,
//! encoding and destination as a poll's, as one poll. It reads past every
//! `NLMSG_DONE` (`ss -D` writes one per family).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use crate::config::{Config, Family};
use crate::counting::{DumpTotals, TcpInfoLengths};
use crate::export::record::{PollStamp, RecordEncoder};
use crate::export::sink::Sink;
use crate::identity::Identity;
use crate::pipeline::report::{FirstOfEach, RunTotals};
use crate::pipeline::run::{kernel_release, setup, RunError};
use crate::pipeline::sample::Sampler;
use crate::pipeline::writer::RecordWriter;
use crate::wire::message::{
    NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK,
};
use crate::wire::request::{AF_INET, AF_INET6};
use crate::wire::TailLayout;
use xtcp_service::counters::Tally;

/// Socket messages handed to the writer at once, as a dump's datagram would.
const CHUNK: usize = 32 * 1024;
/// The longest message a replay accepts (`ss` reads up to 16 KiB).
const MESSAGE_MAX: usize = 1 << 20;

/// The messages of a dump file, one at a time.
struct DumpFile<R> {
    reader: R,
    /// Bytes read so far, to say where a bad message is.
    offset: u64,
}

/// One message of a dump file: its type, sequence number, and the whole
/// message (header and payload, without padding).
struct FileMessage {
    msg_type: u16,
    seq: u32,
    bytes: Vec<u8>,
}

impl<R: Read> DumpFile<R> {
    /// The next message, `None` at the end of the file.
    fn next(&mut self) -> Result<Option<FileMessage>, String> {
        let mut header = [0u8; NLMSG_HDRLEN];
        let got = read_full(&mut self.reader, &mut header).map_err(|e| e.to_string())?;
        if got == 0 {
            return Ok(None);
        }
        let at = self.offset;
        if got < NLMSG_HDRLEN {
            return Err(format!("a message header cut short at byte {at}"));
        }
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if !(NLMSG_HDRLEN..=MESSAGE_MAX).contains(&len) {
            return Err(format!("a message of {len} bytes at byte {at}"));
        }
        let mut bytes = vec![0u8; len.next_multiple_of(4)];
        bytes[..NLMSG_HDRLEN].copy_from_slice(&header);
        let got =
            read_full(&mut self.reader, &mut bytes[NLMSG_HDRLEN..]).map_err(|e| e.to_string())?;
        // The last message may come without its padding.
        if NLMSG_HDRLEN + got < len {
            return Err(format!("a message of {len} bytes cut short at byte {at}"));
        }
        self.offset += (NLMSG_HDRLEN + got) as u64;
        bytes.truncate(len);
        Ok(Some(FileMessage {
            msg_type: u16::from_ne_bytes([header[4], header[5]]),
            seq: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            bytes,
        }))
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `--replay FILE`: the dump in FILE as one poll, to the destination of
/// `config`. What it did comes back as a run's totals; a file that stops
/// short or holds a malformed message ends the replay with a warning and
/// the message counted as `malformed`.
pub fn replay(config: &Config, identity: &Identity, path: &Path) -> Result<RunTotals, RunError> {
    let file = File::open(path).map_err(setup(format!("--replay {}", path.display())))?;
    let sink = Sink::open(config, None).map_err(setup("opening the destination"))?;
    // The tcp_info tail is read as this kernel lays it out.
    let tail = TailLayout::for_release(&kernel_release());
    let mut writer = RecordWriter::new(
        RecordEncoder::new(identity.clone()),
        sink,
        Sampler::new(config.sampling_modulus),
        tail,
    );
    let mut replay = Replay {
        writer: &mut writer,
        stamp: PollStamp::now(1),
        families: Vec::new(),
        said: FirstOfEach::new("warning: --replay"),
    };
    let mut file = DumpFile {
        reader: BufReader::new(file),
        offset: 0,
    };
    let mut chunk = Chunk {
        bytes: Vec::with_capacity(CHUNK),
        messages: 0,
        key: (0, 0),
    };
    loop {
        let msg = match file.next() {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(e) => {
                xtcp_service::say!(
                    "warning: --replay {}: {e}; the rest is not read",
                    path.display()
                );
                replay.totals(chunk.key.1).malformed += 1;
                break;
            }
        };
        match msg.msg_type {
            SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => {
                let key = (msg.seq, msg.bytes.get(NLMSG_HDRLEN).copied().unwrap_or(0));
                let full = chunk.bytes.len() + msg.bytes.len() > CHUNK;
                if chunk.messages > 0 && (key != chunk.key || full) {
                    if !replay.chunk(&chunk)? {
                        return Ok(replay.finish());
                    }
                    chunk.bytes.clear();
                    chunk.messages = 0;
                }
                chunk.key = key;
                chunk.messages += 1;
                chunk.bytes.extend_from_slice(&msg.bytes);
                chunk.bytes.resize(chunk.bytes.len().next_multiple_of(4), 0);
            }
            NLMSG_ERROR => {
                let errno = msg.bytes.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4);
                if errno.is_some_and(|e| e != [0; 4]) {
                    replay.totals(chunk.key.1).kernel_errors += 1;
                }
            }
            // The end of one family's dump; `ss -D` writes one per family.
            NLMSG_DONE => {}
            _ => {}
        }
    }
    if chunk.messages > 0 {
        replay.chunk(&chunk)?;
    }
    Ok(replay.finish())
}

/// Socket messages of one dump and family, handed to the writer together
/// as a dump's datagram would be.
struct Chunk {
    bytes: Vec<u8>,
    messages: u64,
    /// The sequence number and family of the messages.
    key: (u32, u8),
}

/// A replay in progress.
struct Replay<'a> {
    writer: &'a mut RecordWriter,
    stamp: PollStamp,
    families: Vec<(Family, DumpTotals)>,
    said: FirstOfEach,
}

impl Replay<'_> {
    /// The totals of the family `af` (IPv4 for anything else).
    fn totals(&mut self, af: u8) -> &mut DumpTotals {
        let af = if af == AF_INET6 { AF_INET6 } else { AF_INET };
        let i = match self.families.iter().position(|(f, _)| f.af == af) {
            Some(i) => i,
            None => {
                let family = Family {
                    af,
                    netlinkers: 0,
                    inetdiagers: 0,
                };
                self.families.push((family, DumpTotals::default()));
                self.families.len() - 1
            }
        };
        &mut self.families[i].1
    }

    /// What the replay did, as one poll.
    fn finish(self) -> RunTotals {
        let mut families = self.families;
        families.sort_by_key(|(f, _)| f.af);
        RunTotals {
            polls: 1,
            families,
            ..RunTotals::default()
        }
    }

    /// Sends the records of one chunk. `false` when stdout was closed
    /// (`| head`): the replay stops there, quietly.
    fn chunk(&mut self, chunk: &Chunk) -> Result<bool, RunError> {
        let (seq, af) = chunk.key;
        let mut tally = DumpTotals {
            datagrams: 1,
            bytes: chunk.bytes.len() as u64,
            messages: chunk.messages,
            sockets: chunk.messages,
            ..DumpTotals::default()
        };
        let mut lengths = TcpInfoLengths::default();
        let said = &mut self.said;
        let written = self.writer.write_datagram(
            &chunk.bytes,
            seq,
            &self.stamp,
            &mut tally,
            &mut lengths,
            |e| said.say("decode", &e),
        );
        let (flushed, send_error) = self.writer.flush(written, &mut tally);
        if let Some(e) = send_error {
            self.said.say("send", &e);
        }
        self.totals(af).add(&tally);
        match flushed {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(RunError::Aborted(format!("writing records: {e}"))),
        }
    }
}
