//! `INET_DIAG_REQ_BYTECODE` filter programs (`include/uapi/linux/inet_diag.h`,
//! run by `inet_diag_bc_run` in `net/ipv4/inet_diag.c`).
//!
//! A program is a list of 4-byte `struct inet_diag_bc_op { u8 code; u8 yes;
//! u16 no; }`. Each op tests the socket; the kernel then moves `yes` or `no`
//! bytes forward. The socket is accepted when the walk ends exactly at the
//! end of the program, and rejected by a jump 4 bytes past it. Port tests
//! take the port from a second op's `no` field.

const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;

/// Bytes of one port comparison: the op and the op holding the port.
const PORT_TEST_LEN: usize = 8;

/// A program accepting the sockets whose local (source) port lies in
/// `low..=high`.
pub fn source_port_range(low: u16, high: u16) -> Vec<u8> {
    let tests = [(INET_DIAG_BC_S_GE, low), (INET_DIAG_BC_S_LE, high)];
    let len = tests.len() * PORT_TEST_LEN;
    let mut program = Vec::with_capacity(len);
    for (i, (code, port)) in tests.into_iter().enumerate() {
        // From this op, the end of the program plus 4 is the reject target.
        let reject = (len - i * PORT_TEST_LEN + 4) as u16;
        program.extend_from_slice(&[code, PORT_TEST_LEN as u8]);
        program.extend_from_slice(&reject.to_ne_bytes());
        program.extend_from_slice(&[0, 0]);
        program.extend_from_slice(&port.to_ne_bytes());
    }
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `inet_diag_bc_run` for the two port ops this module emits.
    fn run(program: &[u8], sport: u16) -> bool {
        let mut at = 0i64;
        let len = program.len() as i64;
        while at < len {
            let op = &program[at as usize..];
            let port = u16::from_ne_bytes([op[6], op[7]]);
            let yes = match op[0] {
                INET_DIAG_BC_S_GE => sport >= port,
                INET_DIAG_BC_S_LE => sport <= port,
                code => panic!("unexpected op {code}"),
            };
            at += i64::from(if yes {
                u16::from(op[1])
            } else {
                u16::from_ne_bytes([op[2], op[3]])
            });
        }
        at == len
    }

    #[test]
    fn source_port_range_accepts_exactly_the_range() {
        let p = source_port_range(1000, 1999);
        assert_eq!(p.len(), 16);
        // Reject jumps land 4 bytes past the end, as the kernel's audit allows.
        assert_eq!(u16::from_ne_bytes([p[2], p[3]]), 20);
        assert_eq!(u16::from_ne_bytes([p[10], p[11]]), 12);
        for (port, inside) in [
            (0, false),
            (999, false),
            (1000, true),
            (1999, true),
            (2000, false),
        ] {
            assert_eq!(run(&p, port), inside, "port {port}");
        }
        assert!(run(&source_port_range(0, u16::MAX), u16::MAX));
    }
}
