//! The one error type of the wire layer. Every message carries the numbers
//! that were wrong so a counted error in production can be understood from
//! the log line alone.

/// What was wrong with bytes handed to the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("netlink header truncated: {remaining} bytes left, a header needs 16")]
    TruncatedHeader { remaining: usize },
    #[error("netlink message length {len} is shorter than its 16-byte header")]
    MessageTooShort { len: u32 },
    #[error("netlink message length {len} overruns the {remaining} bytes left in the buffer")]
    MessageOverrun { len: u32, remaining: usize },
    #[error("netlink {kind} payload is {len} bytes, needs {need}")]
    ShortControlMessage {
        kind: &'static str,
        len: usize,
        need: usize,
    },
    #[error("inet_diag_msg payload is {len} bytes, needs 72")]
    ShortInetDiagMsg { len: usize },
    #[error("unsupported address family {family} (expected 2 AF_INET or 10 AF_INET6)")]
    BadFamily { family: u8 },
    #[error("attribute header truncated at offset {offset}: {remaining} bytes left, needs 4")]
    TruncatedAttribute { offset: usize, remaining: usize },
    #[error(
        "attribute type {kind} at offset {offset}: length {len} is less than its 4-byte header"
    )]
    AttributeTooShort { kind: u16, offset: usize, len: u16 },
    #[error(
        "attribute type {kind} at offset {offset}: length {len} overruns the {remaining} bytes left in the message"
    )]
    AttributeOverrun {
        kind: u16,
        offset: usize,
        len: u16,
        remaining: usize,
    },
    #[error("attribute {name} has {len} payload bytes, needs at least {need}")]
    ShortAttribute {
        name: &'static str,
        len: usize,
        need: usize,
    },
    #[error("congestion control name is not UTF-8 ({len} bytes)")]
    BadCongestionName { len: usize },
    #[error("congestion control name is {len} bytes, the kernel allows at most 15")]
    LongCongestionName { len: usize },
}
