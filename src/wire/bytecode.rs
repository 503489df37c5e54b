//! `INET_DIAG_REQ_BYTECODE` filter programs (`include/uapi/linux/inet_diag.h`,
//! run by `inet_diag_bc_run` and checked by `inet_diag_bc_audit` in
//! `net/ipv4/inet_diag.c`).
//!
//! A program is a list of ops, each starting with a 4-byte `struct
//! inet_diag_bc_op { u8 code; u8 yes; u16 no; }`. An op tests the socket;
//! the kernel then moves `yes` or `no` bytes forward. The socket is accepted
//! when the walk ends exactly at the end of the program, and rejected by a
//! jump 4 bytes past it.
//!
//! The audit only takes forward jumps, and a `no` jump must land on an op
//! reached by following `yes` offsets from the start. So every op here
//! falls through to the next one when its test holds (`yes` = its own
//! length) and only `no` jumps; "jump when true" is a test followed by an
//! unconditional `JMP`.

use std::net::IpAddr;

const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
const INET_DIAG_BC_D_GE: u8 = 4;
const INET_DIAG_BC_D_LE: u8 = 5;
const INET_DIAG_BC_S_COND: u8 = 7;
const INET_DIAG_BC_D_COND: u8 = 8;
const INET_DIAG_BC_CGROUP_COND: u8 = 13;

/// Largest program: the attribute's `u16` length holds its 4-byte header too.
pub const MAX_PROGRAM_LEN: usize = u16::MAX as usize - 4;

/// Which end of the connection a test looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The local end (`sport`, `src`): `inet_num`, `rcv_saddr`.
    Local,
    /// The remote end (`dport`, `dst`).
    Remote,
}

/// A filter expression, as `--filter` parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// The port at `side` lies in `low..=high`.
    Port {
        side: Side,
        low: u16,
        high: u16,
    },
    /// The address at `side` starts with the first `len` bits of `addr`.
    /// An IPv4 prefix also matches IPv4-mapped IPv6 addresses (the
    /// kernel's rule).
    Prefix {
        side: Side,
        addr: IpAddr,
        len: u8,
    },
    /// The socket's cgroup v2 id is `id` (Linux 5.9+). Only full sockets
    /// have one: TIME_WAIT and SYN_RECV sockets never match.
    Cgroup {
        id: u64,
    },
    Not(Box<Expr>),
    /// Every one holds (and, for an empty list, true).
    And(Vec<Expr>),
    /// Some one holds (false for an empty list).
    Or(Vec<Expr>),
}

/// Why an expression has no program.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "the filter compiles to {0} bytes of bytecode, more than the kernel's {MAX_PROGRAM_LEN}"
    )]
    TooLong(usize),
    #[error("prefix length {len} is longer than the address ({max} bits)")]
    PrefixTooLong { len: u8, max: u8 },
}

/// Compiles `expr` to a program the kernel's audit accepts.
pub fn compile(expr: &Expr) -> Result<Vec<u8>, CompileError> {
    let mut e = Emitter::default();
    e.emit(expr, Target::Reject)?;
    e.finish()
}

/// A jump target: a label placed between ops, or past the end.
#[derive(Debug, Clone, Copy)]
enum Target {
    Label(usize),
    Reject,
}

struct Op {
    code: u8,
    /// Bytes after the 4-byte op header (port op, hostcond).
    data: Vec<u8>,
    /// Where the walk goes when the test fails (always, for `JMP`).
    no: Target,
}

#[derive(Default)]
struct Emitter {
    ops: Vec<Op>,
    /// Label -> index of the op it precedes (`ops.len()`: the end).
    labels: Vec<usize>,
}

impl Emitter {
    fn label(&mut self) -> usize {
        self.labels.push(usize::MAX);
        self.labels.len() - 1
    }

    fn place(&mut self, label: usize) {
        self.labels[label] = self.ops.len();
    }

    fn op(&mut self, code: u8, data: Vec<u8>, no: Target) {
        self.ops.push(Op { code, data, no });
    }

    /// Emits code that falls through past its end when `expr` holds and
    /// jumps to `fail` when it does not.
    fn emit(&mut self, expr: &Expr, fail: Target) -> Result<(), CompileError> {
        match expr {
            Expr::Port { side, low, high } => {
                let (ge, le) = match side {
                    Side::Local => (INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE),
                    Side::Remote => (INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE),
                };
                // A bound at the end of the port space always holds: no op.
                // The port sits in the `no` field of a second op.
                let port_op = |port: u16| [[0, 0], port.to_ne_bytes()].concat();
                if *low > 0 {
                    self.op(ge, port_op(*low), fail);
                }
                if *high < u16::MAX {
                    self.op(le, port_op(*high), fail);
                }
            }
            Expr::Prefix { side, addr, len } => {
                let code = match side {
                    Side::Local => INET_DIAG_BC_S_COND,
                    Side::Remote => INET_DIAG_BC_D_COND,
                };
                let (family, bytes) = match addr {
                    IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
                    IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
                };
                let max = (bytes.len() * 8) as u8;
                if *len > max {
                    return Err(CompileError::PrefixTooLong { len: *len, max });
                }
                // struct inet_diag_hostcond { u8 family; u8 prefix_len;
                // (2 bytes padding) int port; __be32 addr[]; }, port -1: any.
                let mut cond = vec![family, *len, 0, 0];
                cond.extend_from_slice(&(-1i32).to_ne_bytes());
                cond.extend_from_slice(&bytes);
                self.op(code, cond, fail);
            }
            Expr::Cgroup { id } => {
                // Read unaligned by the kernel, in host order.
                self.op(INET_DIAG_BC_CGROUP_COND, id.to_ne_bytes().to_vec(), fail);
            }
            Expr::And(all) => {
                for e in all {
                    self.emit(e, fail)?;
                }
            }
            Expr::Or(any) => {
                let Some((last, rest)) = any.split_last() else {
                    self.op(INET_DIAG_BC_JMP, Vec::new(), fail);
                    return Ok(());
                };
                let done = self.label();
                for e in rest {
                    let try_next = self.label();
                    self.emit(e, Target::Label(try_next))?;
                    self.op(INET_DIAG_BC_JMP, Vec::new(), Target::Label(done));
                    self.place(try_next);
                }
                self.emit(last, fail)?;
                self.place(done);
            }
            Expr::Not(a) => {
                let holds_not = self.label();
                self.emit(a, Target::Label(holds_not))?;
                self.op(INET_DIAG_BC_JMP, Vec::new(), fail);
                self.place(holds_not);
            }
        }
        Ok(())
    }

    /// Lays the ops out and resolves the jumps.
    fn finish(self) -> Result<Vec<u8>, CompileError> {
        let mut starts = Vec::with_capacity(self.ops.len() + 1);
        let mut len = 0;
        for op in &self.ops {
            starts.push(len);
            len += 4 + op.data.len();
        }
        starts.push(len);
        if len > MAX_PROGRAM_LEN {
            return Err(CompileError::TooLong(len));
        }
        let mut program = Vec::with_capacity(len);
        for (i, op) in self.ops.iter().enumerate() {
            let to = match op.no {
                Target::Label(l) => starts[self.labels[l]],
                Target::Reject => len + 4,
            };
            // Both offsets are forward and fit: ops are at most 28 bytes,
            // the program at most MAX_PROGRAM_LEN.
            let yes = (4 + op.data.len()) as u8;
            let no = (to - starts[i]) as u16;
            program.extend_from_slice(&[op.code, yes]);
            program.extend_from_slice(&no.to_ne_bytes());
            program.extend_from_slice(&op.data);
        }
        Ok(program)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// What `inet_diag_bc_sk` knows of a socket.
    #[derive(Debug, Clone, Copy)]
    pub struct Entry {
        pub sport: u16,
        pub dport: u16,
        pub saddr: IpAddr,
        pub daddr: IpAddr,
        /// 0 for a socket that is not full.
        pub cgroup_id: u64,
    }

    fn prefix_match(addr: &[u8], want: &[u8], bits: u8) -> bool {
        let bits = usize::from(bits);
        let whole = bits / 8;
        if addr[..whole] != want[..whole] {
            return false;
        }
        let rest = bits % 8;
        rest == 0 || (addr[whole] ^ want[whole]) & (0xff << (8 - rest)) == 0
    }

    /// `inet_diag_bc_audit`, then `inet_diag_bc_run`: `None` when the
    /// kernel would refuse the program (EINVAL).
    pub fn run(program: &[u8], e: &Entry) -> Option<bool> {
        audit(program)?;
        let field = |at: usize| u16::from_ne_bytes([program[at], program[at + 1]]);
        let mut at = 0usize;
        while at < program.len() {
            let op = &program[at..];
            let yes = match op[0] {
                INET_DIAG_BC_JMP => false,
                INET_DIAG_BC_S_GE => e.sport >= field(at + 6),
                INET_DIAG_BC_S_LE => e.sport <= field(at + 6),
                INET_DIAG_BC_D_GE => e.dport >= field(at + 6),
                INET_DIAG_BC_D_LE => e.dport <= field(at + 6),
                INET_DIAG_BC_CGROUP_COND => {
                    u64::from_ne_bytes(op[4..12].try_into().unwrap()) == e.cgroup_id
                }
                code @ (INET_DIAG_BC_S_COND | INET_DIAG_BC_D_COND) => {
                    let addr = if code == INET_DIAG_BC_S_COND {
                        e.saddr
                    } else {
                        e.daddr
                    };
                    let (family, bits) = (op[4], op[5]);
                    match (family, addr) {
                        (2, IpAddr::V4(a)) => prefix_match(&a.octets(), &op[12..16], bits),
                        (10, IpAddr::V6(a)) => prefix_match(&a.octets(), &op[12..28], bits),
                        (2, IpAddr::V6(a)) => a
                            .to_ipv4_mapped()
                            .is_some_and(|a| prefix_match(&a.octets(), &op[12..16], bits)),
                        _ => false,
                    }
                }
                code => panic!("op {code} is not emitted"),
            };
            at += usize::from(if yes { u16::from(op[1]) } else { field(at + 2) });
        }
        Some(at == program.len())
    }

    /// The checks of `inet_diag_bc_audit` for the ops emitted here.
    fn audit(program: &[u8]) -> Option<()> {
        let len = program.len();
        // Offsets reached by following `yes` from the start (`valid_cc`).
        let mut chain = vec![0usize];
        while let Some(&at) = chain.last().filter(|&&at| at < len) {
            chain.push(at + usize::from(program[at + 1]));
        }
        let mut at = 0;
        while at < len {
            let left = len - at;
            let min_len = match program[at] {
                INET_DIAG_BC_JMP => 4,
                INET_DIAG_BC_S_GE | INET_DIAG_BC_S_LE | INET_DIAG_BC_D_GE | INET_DIAG_BC_D_LE => 8,
                INET_DIAG_BC_CGROUP_COND => 12,
                INET_DIAG_BC_S_COND | INET_DIAG_BC_D_COND => match program[at + 4] {
                    2 => 16,
                    10 => 28,
                    _ => return None,
                },
                _ => return None,
            };
            let yes = usize::from(program[at + 1]);
            let no = usize::from(u16::from_ne_bytes([program[at + 2], program[at + 3]]));
            for jump in [yes, no] {
                if jump < min_len || jump > left + 4 || jump % 4 != 0 {
                    return None;
                }
            }
            if no < left && !chain.contains(&(at + no)) {
                return None;
            }
            at += yes;
        }
        (at == len).then_some(())
    }

    fn entry(sport: u16, dport: u16) -> Entry {
        Entry {
            sport,
            dport,
            saddr: Ipv4Addr::new(10, 1, 2, 3).into(),
            daddr: Ipv6Addr::LOCALHOST.into(),
            cgroup_id: 7,
        }
    }

    fn port(side: Side, low: u16, high: u16) -> Expr {
        Expr::Port { side, low, high }
    }

    fn not(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    fn and(a: Expr, b: Expr) -> Expr {
        Expr::And(vec![a, b])
    }

    fn or(a: Expr, b: Expr) -> Expr {
        Expr::Or(vec![a, b])
    }

    #[test]
    fn port_range_accepts_exactly_the_range() {
        let p = compile(&port(Side::Local, 1000, 1999)).unwrap();
        assert_eq!(p.len(), 16);
        // Reject jumps land 4 bytes past the end, as the audit allows.
        assert_eq!(u16::from_ne_bytes([p[2], p[3]]), 20);
        assert_eq!(u16::from_ne_bytes([p[10], p[11]]), 12);
        for (sport, inside) in [
            (0, false),
            (999, false),
            (1000, true),
            (1999, true),
            (2000, false),
        ] {
            assert_eq!(run(&p, &entry(sport, 1)), Some(inside), "port {sport}");
        }
        // The whole port space needs no test at all.
        assert!(compile(&port(Side::Remote, 0, u16::MAX))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn boolean_structure_matches_a_direct_evaluation() {
        let a = port(Side::Local, 10, 19);
        let b = port(Side::Remote, 100, 100);
        let c = not(port(Side::Remote, 0, 50));
        type Direct = fn(u16, u16) -> bool;
        let exprs: Vec<(Expr, Direct)> = vec![
            (and(a.clone(), b.clone()), |s, d| {
                (10..=19).contains(&s) && d == 100
            }),
            (or(a.clone(), b.clone()), |s, d| {
                (10..=19).contains(&s) || d == 100
            }),
            (not(or(a.clone(), b.clone())), |s, d| {
                !((10..=19).contains(&s) || d == 100)
            }),
            (or(and(a.clone(), c.clone()), not(b.clone())), |s, d| {
                ((10..=19).contains(&s) && d > 50) || d != 100
            }),
            (
                and(or(a.clone(), b.clone()), or(c.clone(), not(a.clone()))),
                |s, d| ((10..=19).contains(&s) || d == 100) && (d > 50 || !(10..=19).contains(&s)),
            ),
            (not(not(not(a.clone()))), |s, _| !(10..=19).contains(&s)),
            (not(port(Side::Local, 0, u16::MAX)), |_, _| false),
            (Expr::Or(vec![]), |_, _| false),
            (Expr::And(vec![]), |_, _| true),
            (Expr::Or(vec![b.clone(), a.clone(), c.clone()]), |s, d| {
                d == 100 || (10..=19).contains(&s) || d > 50
            }),
        ];
        for (expr, want) in &exprs {
            let p = compile(expr).unwrap();
            for s in [0, 9, 10, 15, 19, 20, 100] {
                for d in [0, 50, 51, 99, 100, 101] {
                    assert_eq!(
                        run(&p, &entry(s, d)),
                        Some(want(s, d)),
                        "{expr:?} at {s},{d}"
                    );
                }
            }
        }
    }

    #[test]
    fn prefixes_by_family() {
        let v4 = Expr::Prefix {
            side: Side::Local,
            addr: Ipv4Addr::new(10, 0, 0, 0).into(),
            len: 8,
        };
        let v6 = Expr::Prefix {
            side: Side::Remote,
            addr: "::1".parse().unwrap(),
            len: 128,
        };
        let p4 = compile(&v4).unwrap();
        let p6 = compile(&v6).unwrap();
        assert_eq!((p4.len(), p6.len()), (16, 28));
        let mut e = entry(1, 1);
        assert_eq!(run(&p4, &e), Some(true));
        assert_eq!(run(&p6, &e), Some(true));
        e.saddr = Ipv4Addr::new(11, 0, 0, 1).into();
        e.daddr = "::2".parse().unwrap();
        assert_eq!(run(&p4, &e), Some(false));
        assert_eq!(run(&p6, &e), Some(false));
        // IPv4-mapped IPv6 addresses match IPv4 prefixes; IPv6 prefixes
        // never match IPv4 sockets.
        e.saddr = "::ffff:10.9.9.9".parse().unwrap();
        assert_eq!(run(&p4, &e), Some(true));
        e.daddr = Ipv4Addr::LOCALHOST.into();
        assert_eq!(run(&p6, &e), Some(false));
        let odd = Expr::Prefix {
            side: Side::Local,
            addr: Ipv4Addr::new(192, 168, 0, 0).into(),
            len: 23,
        };
        let p = compile(&odd).unwrap();
        e.saddr = Ipv4Addr::new(192, 168, 1, 200).into();
        assert_eq!(run(&p, &e), Some(true));
        e.saddr = Ipv4Addr::new(192, 168, 2, 0).into();
        assert_eq!(run(&p, &e), Some(false));
        let long = Expr::Prefix {
            side: Side::Local,
            addr: Ipv4Addr::UNSPECIFIED.into(),
            len: 33,
        };
        assert_eq!(
            compile(&long),
            Err(CompileError::PrefixTooLong { len: 33, max: 32 })
        );
    }

    #[test]
    fn cgroups_match_their_id_only() {
        let c = compile(&Expr::Cgroup { id: 7 }).unwrap();
        assert_eq!(c.len(), 12);
        let mut e = entry(1, 1);
        assert_eq!(run(&c, &e), Some(true));
        e.cgroup_id = 8;
        assert_eq!(run(&c, &e), Some(false));
        // Not a full socket: no cgroup.
        e.cgroup_id = 0;
        assert_eq!(run(&c, &e), Some(false));
        let either = compile(&or(Expr::Cgroup { id: 7 }, Expr::Cgroup { id: u64::MAX })).unwrap();
        e.cgroup_id = u64::MAX;
        assert_eq!(run(&either, &e), Some(true));
        assert_eq!(
            run(&compile(&not(Expr::Cgroup { id: 7 })).unwrap(), &e),
            Some(true)
        );
    }

    #[test]
    fn oversized_programs_are_refused() {
        let e = Expr::Or(vec![port(Side::Remote, 3, 4); 4000]);
        assert!(matches!(compile(&e), Err(CompileError::TooLong(n)) if n > MAX_PROGRAM_LEN));
    }
}
