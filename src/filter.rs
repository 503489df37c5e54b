//! `--filter`: a small language for the sockets to dump, compiled to the
//! kernel's `INET_DIAG_REQ_BYTECODE` ([`crate::wire::bytecode`]) so the
//! kernel never builds messages for the sockets left out.
//!
//! ```text
//! filter := or
//! or     := and { ("or" | "||") and }
//! and    := unary { ("and" | "&&") unary }
//! unary  := ("not" | "!") unary | "(" or ")" | test
//! test   := ("sport" | "dport") port | ("src" | "dst") address | "cgroup" path
//! port   := ["=" | "=="] N | N "-" N | ">=" N | "<=" N | ">" N | "<" N
//! address:= IPv4 or IPv6 address, optionally "/" prefix length
//! path   := a cgroup2 path from its root, "/" first, as `ss -e` prints it
//! ```
//!
//! `sport`/`src` are the local end, `dport`/`dst` the remote end, as in
//! `ss`. `cgroup` takes the sockets of exactly that cgroup (not of those
//! below it), as `ss` does: its id is read at parse time from the cgroup2
//! mount. `not` binds tightest, then `and`, then `or`. Errors name the
//! character position (1-based) where the input stops making sense.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::attribution::find_cgroup2_root;
use crate::wire::bytecode::{compile, Expr, Side};

/// Parentheses and `not`s deeper than this are refused, so a hostile
/// `--filter` cannot overflow the stack.
const MAX_DEPTH: usize = 32;

/// A parsed and compiled `--filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The text as given, for `--print-config`.
    source: String,
    expr: Expr,
    program: Vec<u8>,
}

impl Filter {
    /// The bytecode for the dump request.
    pub fn program(&self) -> &[u8] {
        &self.program
    }

    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// Whether the text was only whitespace: a filter that keeps every
    /// socket, as `XTCP_FILTER=` in an environment file means.
    pub fn is_blank(&self) -> bool {
        self.source.trim().is_empty()
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Where and why a filter does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// 1-based character position; one past the end for "ended too soon".
    pub position: usize,
    pub message: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at character {}: {}", self.position, self.message)
    }
}

impl std::error::Error for FilterError {}

impl FromStr for Filter {
    type Err = FilterError;

    fn from_str(source: &str) -> Result<Self, FilterError> {
        let tokens = tokenize(source)?;
        let end = source.chars().count() + 1;
        let mut p = Parser {
            tokens: &tokens,
            at: 0,
            end,
            depth: 0,
        };
        let expr = if tokens.is_empty() {
            Expr::And(Vec::new())
        } else {
            p.or()?
        };
        if let Some(t) = p.peek() {
            let what = match t.text {
                ")" => "unmatched ')'".to_string(),
                text => format!("expected 'and', 'or' or the end, found '{text}'"),
            };
            return Err(p.error(t.position, &what));
        }
        let program = compile(&expr).map_err(|e| p.error(1, &e.to_string()))?;
        Ok(Filter {
            source: source.to_string(),
            expr,
            program,
        })
    }
}

#[derive(Clone, Copy)]
struct Token<'a> {
    text: &'a str,
    position: usize,
}

/// Symbols stand alone; everything else runs to the next space or symbol,
/// so `10.0.0.0/8`, `::1` and `1000-2000` are one word each.
fn tokenize(source: &str) -> Result<Vec<Token<'_>>, FilterError> {
    // Longest first, so ">=" is not read as ">" then "=".
    const SYMBOLS: [&str; 11] = ["&&", "||", "==", ">=", "<=", "(", ")", "!", "=", ">", "<"];
    let is_symbol_char = |c: char| "()!&|=<>".contains(c);
    let mut tokens = Vec::new();
    let mut chars = source.char_indices().enumerate().peekable();
    while let Some(&(n, (start, c))) = chars.peek() {
        let position = n + 1;
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let rest = &source[start..];
        if is_symbol_char(c) {
            let symbol = SYMBOLS
                .iter()
                .find(|s| rest.starts_with(*s))
                .ok_or_else(|| FilterError {
                    position,
                    message: format!("unexpected '{c}' ('&&' and '||' are doubled)"),
                })?;
            for _ in 0..symbol.len() {
                chars.next();
            }
            tokens.push(Token {
                text: symbol,
                position,
            });
            continue;
        }
        let len = rest
            .find(|c: char| c.is_whitespace() || is_symbol_char(c))
            .unwrap_or(rest.len());
        for _ in rest[..len].chars() {
            chars.next();
        }
        tokens.push(Token {
            text: &rest[..len],
            position,
        });
    }
    Ok(tokens)
}

struct Parser<'t, 'a> {
    tokens: &'t [Token<'a>],
    at: usize,
    /// Position reported when the input ends too soon.
    end: usize,
    depth: usize,
}

impl<'a> Parser<'_, 'a> {
    fn error(&self, position: usize, message: &str) -> FilterError {
        FilterError {
            position,
            message: message.to_string(),
        }
    }

    fn peek(&self) -> Option<Token<'a>> {
        self.tokens.get(self.at).copied()
    }

    fn next(&mut self, expected: &str) -> Result<Token<'a>, FilterError> {
        let t = self
            .peek()
            .ok_or_else(|| self.error(self.end, &format!("ended where {expected} was expected")))?;
        self.at += 1;
        Ok(t)
    }

    fn eat(&mut self, words: &[&str]) -> bool {
        let hit = self.peek().is_some_and(|t| words.contains(&t.text));
        self.at += usize::from(hit);
        hit
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        self.chain(&["or", "||"], Self::and, Expr::Or)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        self.chain(&["and", "&&"], Self::unary, Expr::And)
    }

    /// `item { op item }`: a lone item as it is, several joined by `join`.
    fn chain(
        &mut self,
        ops: &[&str],
        item: fn(&mut Self) -> Result<Expr, FilterError>,
        join: fn(Vec<Expr>) -> Expr,
    ) -> Result<Expr, FilterError> {
        let mut items = vec![item(self)?];
        while self.eat(ops) {
            items.push(item(self)?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            join(items)
        })
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        let t = self.next("a test, 'not' or '('")?;
        let position = t.position;
        let nested = |p: &mut Self| {
            if p.depth == MAX_DEPTH {
                return Err(p.error(position, &format!("nested deeper than {MAX_DEPTH}")));
            }
            p.depth += 1;
            Ok(())
        };
        let expr = match t.text {
            "not" | "!" => {
                nested(self)?;
                Expr::Not(Box::new(self.unary()?))
            }
            "(" => {
                nested(self)?;
                let inner = self.or()?;
                let close = self.next("')'")?;
                if close.text != ")" {
                    let found = close.text;
                    return Err(self.error(
                        close.position,
                        &format!(
                            "expected ')' for the '(' at character {position}, found '{found}'"
                        ),
                    ));
                }
                inner
            }
            "sport" => self.port(Side::Local)?,
            "dport" => self.port(Side::Remote)?,
            "src" => self.prefix(Side::Local)?,
            "dst" => self.prefix(Side::Remote)?,
            "cgroup" => self.cgroup()?,
            other => {
                return Err(self.error(
                    position,
                    &format!(
                        "expected sport, dport, src, dst, cgroup, 'not' or '(', found '{other}'"
                    ),
                ))
            }
        };
        if matches!(t.text, "not" | "!" | "(") {
            self.depth -= 1;
        }
        Ok(expr)
    }

    fn port(&mut self, side: Side) -> Result<Expr, FilterError> {
        let t = self.next("a port")?;
        let (op, t) = match t.text {
            "=" | "==" => ("=", self.next("a port")?),
            ">=" | "<=" | ">" | "<" => (t.text, self.next("a port")?),
            _ => ("=", t),
        };
        let position = t.position;
        let number = |text: &str, at: usize| {
            text.parse::<u16>()
                .map_err(|_| self.error(at, &format!("'{text}' is not a port (0 to 65535)")))
        };
        let (low, high) = match (op, t.text.split_once('-')) {
            ("=", Some((a, b))) => {
                let low = number(a, position)?;
                let high = number(b, position + a.chars().count() + 1)?;
                if low > high {
                    return Err(self.error(position, &format!("the range {a}-{b} is empty")));
                }
                (low, high)
            }
            ("=", None) => {
                let n = number(t.text, position)?;
                (n, n)
            }
            (">=", _) => (number(t.text, position)?, u16::MAX),
            ("<=", _) => (0, number(t.text, position)?),
            (">", _) => {
                let n = number(t.text, position)?;
                let low = n
                    .checked_add(1)
                    .ok_or_else(|| self.error(position, "no port is above 65535"))?;
                (low, u16::MAX)
            }
            _ => {
                let n = number(t.text, position)?;
                let high = n
                    .checked_sub(1)
                    .ok_or_else(|| self.error(position, "no port is below 0"))?;
                (0, high)
            }
        };
        Ok(Expr::Port { side, low, high })
    }

    /// A cgroup's path, resolved to its id: the inode of its directory
    /// under the cgroup2 mount.
    fn cgroup(&mut self) -> Result<Expr, FilterError> {
        use std::os::unix::fs::MetadataExt;
        let t = self.next("a cgroup path")?;
        let fail = |message: String| self.error(t.position, &message);
        let relative = t.text.strip_prefix('/').ok_or_else(|| {
            fail(format!(
                "'{}' is not a cgroup path (from the cgroup2 root, starting with '/')",
                t.text
            ))
        })?;
        if relative.split('/').any(|c| c == "..") {
            return Err(fail(format!("'{}' leaves the cgroup2 tree", t.text)));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = find_cgroup2_root(&mountinfo)
            .ok_or_else(|| fail("no cgroup2 file system is mounted".to_string()))?;
        let dir = root.join(relative);
        match std::fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(Expr::Cgroup { id: meta.ino() }),
            Ok(_) => Err(fail(format!("{} is not a cgroup", dir.display()))),
            Err(e) => Err(fail(format!("cgroup {}: {}: {e}", t.text, dir.display()))),
        }
    }

    fn prefix(&mut self, side: Side) -> Result<Expr, FilterError> {
        let t = self.next("an address")?;
        let position = t.position;
        let (addr_text, len_text) = match t.text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (t.text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            self.error(
                position,
                &format!("'{addr_text}' is not an IPv4 or IPv6 address"),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(l) => {
                let at = position + addr_text.chars().count() + 1;
                l.parse::<u8>().ok().filter(|&n| n <= max).ok_or_else(|| {
                    self.error(at, &format!("'{l}' is not a prefix length (0 to {max})"))
                })?
            }
        };
        Ok(Expr::Prefix { side, addr, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::bytecode::tests::{run, Entry};
    use std::net::Ipv4Addr;

    fn parse(s: &str) -> Result<Expr, String> {
        s.parse::<Filter>()
            .map(|f| f.expr)
            .map_err(|e| e.to_string())
    }

    fn port(side: Side, low: u16, high: u16) -> Expr {
        Expr::Port { side, low, high }
    }

    #[test]
    fn tests_and_precedence() {
        assert_eq!(parse("sport 22"), Ok(port(Side::Local, 22, 22)));
        assert_eq!(parse("dport == 443"), Ok(port(Side::Remote, 443, 443)));
        assert_eq!(parse("sport 1000-2000"), Ok(port(Side::Local, 1000, 2000)));
        assert_eq!(parse("dport>=1024"), Ok(port(Side::Remote, 1024, 65535)));
        assert_eq!(parse("dport <= 1023"), Ok(port(Side::Remote, 0, 1023)));
        assert_eq!(parse("dport > 1023"), Ok(port(Side::Remote, 1024, 65535)));
        assert_eq!(parse("dport < 1024"), Ok(port(Side::Remote, 0, 1023)));
        assert_eq!(
            parse("src 10.0.0.0/8"),
            Ok(Expr::Prefix {
                side: Side::Local,
                addr: Ipv4Addr::new(10, 0, 0, 0).into(),
                len: 8
            })
        );
        assert_eq!(
            parse("dst ::1"),
            Ok(Expr::Prefix {
                side: Side::Remote,
                addr: "::1".parse().unwrap(),
                len: 128
            })
        );
        // not > and > or.
        let a = || port(Side::Local, 1, 1);
        let b = || port(Side::Local, 2, 2);
        let c = || port(Side::Local, 3, 3);
        assert_eq!(
            parse("sport 1 or sport 2 and not sport 3"),
            Ok(Expr::Or(vec![
                a(),
                Expr::And(vec![b(), Expr::Not(Box::new(c()))])
            ]))
        );
        assert_eq!(
            parse("(sport 1 || sport 2) && !sport 3"),
            Ok(Expr::And(vec![
                Expr::Or(vec![a(), b()]),
                Expr::Not(Box::new(c()))
            ]))
        );
    }

    #[test]
    fn errors_say_where() {
        for (text, want) in [
            ("sport", "at character 6: ended where a port was expected"),
            (
                "sport 70000",
                "at character 7: '70000' is not a port (0 to 65535)",
            ),
            (
                "sport 10-x",
                "at character 10: 'x' is not a port (0 to 65535)",
            ),
            ("sport 20-10", "at character 7: the range 20-10 is empty"),
            ("dport > 65535", "at character 9: no port is above 65535"),
            (
                "sport 1 and",
                "at character 12: ended where a test, 'not' or '(' was expected",
            ),
            (
                "sport 1 sport 2",
                "at character 9: expected 'and', 'or' or the end, found 'sport'",
            ),
            (
                "port 22",
                "at character 1: expected sport, dport, src, dst, cgroup, 'not' or '(', found 'port'",
            ),
            ("(sport 1", "at character 9: ended where ')' was expected"),
            (
                "(sport 1 or",
                "at character 12: ended where a test, 'not' or '(' was expected",
            ),
            ("sport 1)", "at character 8: unmatched ')'"),
            (
                "sport 1 & sport 2",
                "at character 9: unexpected '&' ('&&' and '||' are doubled)",
            ),
            (
                "src 10.0.0/8",
                "at character 5: '10.0.0' is not an IPv4 or IPv6 address",
            ),
            (
                "dst 10.0.0.0/33",
                "at character 14: '33' is not a prefix length (0 to 32)",
            ),
            (
                "dst ::/129",
                "at character 8: '129' is not a prefix length (0 to 128)",
            ),
            (
                "dst ü",
                "at character 5: 'ü' is not an IPv4 or IPv6 address",
            ),
            (
                "ü and x",
                "at character 1: expected sport, dport, src, dst, cgroup, 'not' or '(', found 'ü'",
            ),
            (
                "cgroup system.slice",
                "at character 8: 'system.slice' is not a cgroup path (from the cgroup2 root, starting with '/')",
            ),
            ("cgroup /a/../..", "at character 8: '/a/../..' leaves the cgroup2 tree"),
        ] {
            assert_eq!(parse(text), Err(want.to_string()), "{text:?}");
        }
        let deep = format!("{}sport 1{}", "(".repeat(40), ")".repeat(40));
        assert_eq!(
            parse(&deep),
            Err("at character 33: nested deeper than 32".into())
        );
        assert!(parse(&format!("{}sport 1", "not ".repeat(40))).is_err());
        let fine = format!("{}sport 1{}", "(".repeat(32), ")".repeat(32));
        assert!(parse(&fine).is_ok());
        let long = vec!["sport 1-2"; 5000].join(" or ");
        let err = parse(&long).unwrap_err();
        assert!(err.contains("more than the kernel's"), "{err}");
    }

    #[test]
    fn blank_selects_everything() {
        for blank in ["", "  "] {
            let f: Filter = blank.parse().unwrap();
            assert!(f.is_blank() && f.program().is_empty());
        }
        assert!(!"sport 0-65535".parse::<Filter>().unwrap().is_blank());
    }

    #[test]
    fn compiled_filters_select_as_written() {
        let f: Filter = "(sport 20001-20010 or dst 10.0.0.0/8) and not dport 22"
            .parse()
            .unwrap();
        assert_eq!(
            f.to_string(),
            "(sport 20001-20010 or dst 10.0.0.0/8) and not dport 22"
        );
        let e = |sport, dport, daddr: [u8; 4]| Entry {
            sport,
            dport,
            saddr: Ipv4Addr::LOCALHOST.into(),
            daddr: Ipv4Addr::from(daddr).into(),
            cgroup_id: 0,
        };
        assert_eq!(run(f.program(), &e(20005, 80, [1, 1, 1, 1])), Some(true));
        assert_eq!(run(f.program(), &e(20005, 22, [1, 1, 1, 1])), Some(false));
        assert_eq!(run(f.program(), &e(30000, 80, [10, 1, 1, 1])), Some(true));
        assert_eq!(run(f.program(), &e(30000, 80, [11, 1, 1, 1])), Some(false));
    }
}
