//! TCP states as `inet_diag_msg.idiag_state` numbers them
//! (`include/net/tcp_states.h`), with the names the CLI accepts and the
//! labels `ss` prints.

/// `(state number, --states name, ss label)`.
pub const TCP_STATES: [(u8, &str, &str); 13] = [
    (1, "established", "ESTAB"),
    (2, "syn-sent", "SYN-SENT"),
    (3, "syn-recv", "SYN-RECV"),
    (4, "fin-wait-1", "FIN-WAIT-1"),
    (5, "fin-wait-2", "FIN-WAIT-2"),
    (6, "time-wait", "TIME-WAIT"),
    (7, "close", "UNCONN"),
    (8, "close-wait", "CLOSE-WAIT"),
    (9, "last-ack", "LAST-ACK"),
    (10, "listen", "LISTEN"),
    (11, "closing", "CLOSING"),
    (12, "new-syn-recv", "NEW-SYN-RECV"),
    (13, "bound-inactive", "BOUND-INACTIVE"),
];

/// The `ss`-style label of a state number, `None` for numbers the kernel
/// does not define (yet).
pub fn label(state: u8) -> Option<&'static str> {
    TCP_STATES
        .iter()
        .find(|(n, _, _)| *n == state)
        .map(|(_, _, label)| *label)
}

/// The state number of a `--states` name.
pub fn by_name(name: &str) -> Option<u8> {
    TCP_STATES
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(state, _, _)| *state)
}

/// The `--states` names of the bits set in `mask` (`1 << state`), in state order.
pub fn names(mask: u32) -> impl Iterator<Item = &'static str> {
    TCP_STATES
        .iter()
        .filter(move |(n, _, _)| mask & (1 << n) != 0)
        .map(|(_, name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::request::ALL_STATES;

    #[test]
    fn table_covers_all_states_once() {
        let mask = TCP_STATES.iter().fold(0u32, |m, (n, _, _)| m | 1 << n);
        assert_eq!(mask, ALL_STATES);
        assert_eq!(names(ALL_STATES).count(), TCP_STATES.len());
        assert_eq!(by_name("time-wait"), Some(6));
        assert_eq!(label(1), Some("ESTAB"));
        assert_eq!(label(14), None);
    }
}
