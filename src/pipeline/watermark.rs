//! Watermarks: after every poll, and once when the run stops, how far the
//! run has numbered its records, sent to the UDP destination in a datagram
//! of its own (`export::udp`). A receiver counts a lost tail from it
//! (`xtcp_feed::sequence`): without it the last records of a poll would be
//! missed only when the next poll's arrive, and those of a run's last poll
//! never. The poller sends the poll's, once every record of the poll was
//! handed to the destination; `pipeline::run_with` sends the stop, once
//! every thread is joined. Its number is what the run's encoders had
//! reserved by then: a close record numbered during the poll may follow it
//! by a moment, which the receiver counts as reordered.

use std::io;

use prometheus::IntCounterVec;

use crate::config::{Config, Dest};
use crate::export::record::{RecordEncoder, SCHEMA_VERSION};
use crate::export::sink::Output;
use crate::export::udp::UdpSink;
use crate::identity::Identity;
use crate::pipeline::report::FirstOfEach;
use xtcp_feed::auth::FeedKey;
use xtcp_feed::proto::Watermark;

/// The run's watermark sender.
pub struct Watermarks {
    sink: UdpSink,
    /// Shares the run's record numbering (a clone of the encoders').
    numbering: RecordEncoder,
    /// What every watermark of the run says besides its poll and number.
    run: Watermark,
    /// `xtcp_output_watermarks_total`, by result.
    counter: IntCounterVec,
    said: FirstOfEach,
    pub sent: u64,
    pub failed: u64,
}

impl Watermarks {
    /// The sender for a run whose records go over UDP (`--dest udp:...`,
    /// not `output` elsewhere); `None` for any other destination, which
    /// loses nothing on the way.
    pub fn open(
        config: &Config,
        output: &Output,
        identity: &Identity,
        key: Option<FeedKey>,
        numbering: RecordEncoder,
        counter: IntCounterVec,
    ) -> io::Result<Option<Watermarks>> {
        let (Output::Configured, Dest::Udp(dest)) = (output, &config.dest) else {
            return Ok(None);
        };
        Ok(Some(Watermarks {
            sink: UdpSink::connect(*dest, 0, key)?,
            numbering,
            run: Watermark {
                schema_version: SCHEMA_VERSION,
                hostname: identity.hostname.clone(),
                instance: identity.instance,
                poll_interval_ms: u64::try_from(config.frequency.as_millis()).unwrap_or(u64::MAX),
                ..Watermark::default()
            },
            counter,
            said: FirstOfEach::new("xtcp: warning: watermarks"),
            sent: 0,
            failed: 0,
        }))
    }

    /// Sends the watermark of `poll_id` (the last poll that ended), and
    /// counts it; `stopped` at the end of the run.
    pub fn send(&mut self, poll_id: u64, stopped: bool) {
        let mark = Watermark {
            poll_id,
            record_counter: self.numbering.numbered(),
            stopped,
            ..self.run.clone()
        };
        match self.sink.watermark(&mark) {
            Ok(()) => {
                self.sent += 1;
                self.counter.with_label_values(&["sent"]).inc();
            }
            Err(e) => {
                self.failed += 1;
                self.counter.with_label_values(&["failed"]).inc();
                self.said.say("send", &e);
            }
        }
    }
}
