//! Slurm hostlist expressions: `node[01-03,7]`, `rack[1-2]-node[01-02]`, `oss[1,2].local`.
//!
//! `expand` and `compress` follow `scontrol show hostnames` / `scontrol show hostlist` of current
//! Slurm (23.11 and later); where releases disagree (text after the last bracket, adjacent
//! groups such as `n[1-2][4-5]`), the newest release wins:
//! - items are separated by commas or whitespace outside brackets; empty items are skipped;
//! - zero padding comes from the width of a range's lower bound (`[01-3]` → 01 02 03,
//!   `[1-03]` → 1 2 3);
//! - several bracket groups form a product in Slurm's order: the last group varies fastest,
//!   then the first, the second, ..., the one before the last slowest
//!   (`a[1-2]b[1-2]c[1-2]` → a1b1c1 a1b1c2 a2b1c1 a2b1c2 a1b2c1 ...);
//! - one range holds at most 65,536 hosts, and a group before the last one at most 65,536
//!   values in all ("Too many hosts in range", as Slurm refuses them);
//! - text after the last bracket is kept (`oss[1,2].local`);
//! - input order is kept and nothing is de-duplicated.
//!
//! `compress` mirrors Slurm's `hostlist_push_host` + `hostlist_ranged_string`: a host extends the
//! previous range when it has the same prefix, a compatible zero padding and the next number;
//! neighbouring ranges with the same prefix share one bracket. So order is kept:
//! `node3,node1,node2` → `node[3,1-2]`.

use std::fmt::Write as _;

/// The most hosts one expression may expand to. Far above any real cluster, far below
/// what would exhaust memory on a typo such as `a[0-65535]b[0-65535]` (which Slurm accepts
/// and then takes minutes and gigabytes to expand): ray-launch's own limit, not Slurm's.
pub const MAX_HOSTS: usize = 1 << 20;

/// Slurm's `MAX_RANGE`: one range (`lo-hi`) holds at most this many hosts ("Too many hosts in
/// range"); `n[0-65535]` is accepted, `n[0-65536]` is not.
pub const MAX_RANGE: u64 = 64 * 1024;

/// Slurm's `MAX_PREFIX_CNT`: a bracket group before the last one expands to at most this many
/// values in all.
pub const MAX_PREFIX_CNT: u64 = 64 * 1024;

/// The longest expression read (Slurm's node lists of thousands of nodes are a few KiB).
pub const MAX_EXPR_BYTES: usize = 64 * 1024;

/// The longest host name (DNS: 253; Slurm node names are far shorter).
pub const MAX_NAME: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hostlist {}: {reason}", crate::error::quote(.expr))]
pub struct HostlistError {
    pub expr: String,
    pub reason: String,
}

impl From<HostlistError> for crate::error::Error {
    fn from(e: crate::input::hostlist::HostlistError) -> Self {
        crate::error::Error::usage(e.to_string()).hint(
            "write ranges as `node[01-04,7]`: numbers only, low before high, brackets balanced",
        )
    }
}

fn err(expr: &str, reason: impl Into<String>) -> HostlistError {
    HostlistError {
        expr: expr.to_string(),
        reason: reason.into(),
    }
}

/// One numeric range inside brackets, e.g. `01-03` → lo 1, hi 3, width 2.
#[derive(Debug, Clone, Copy)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

impl Range {
    fn count(&self) -> u64 {
        self.hi - self.lo + 1
    }
}

enum Piece {
    Text(String),
    Group(Vec<Range>),
}

/// Expand a hostlist expression into host names, in order.
pub fn expand(expr: &str) -> Result<Vec<String>, HostlistError> {
    if expr.len() > MAX_EXPR_BYTES {
        return Err(err(
            expr,
            format!(
                "it is {} bytes long, more than {MAX_EXPR_BYTES}",
                expr.len()
            ),
        ));
    }
    let mut hosts = Vec::new();
    for item in split_items(expr)? {
        expand_item(expr, &item, &mut hosts)?;
    }
    Ok(hosts)
}

/// Split at commas and whitespace that are outside brackets.
fn split_items(expr: &str) -> Result<Vec<String>, HostlistError> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    for c in expr.chars() {
        match c {
            '[' => {
                if depth > 0 {
                    return Err(err(expr, "nested `[`"));
                }
                depth += 1;
                cur.push(c);
            }
            ']' => {
                if depth == 0 {
                    return Err(err(expr, "`]` without a matching `[`"));
                }
                depth -= 1;
                cur.push(c);
            }
            c if depth == 0 && (c == ',' || c.is_whitespace()) => {
                if !cur.is_empty() {
                    items.push(std::mem::take(&mut cur));
                }
            }
            c if c.is_whitespace() => return Err(err(expr, "whitespace inside brackets")),
            c => cur.push(c),
        }
    }
    if depth > 0 {
        return Err(err(expr, "unclosed `[`"));
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    Ok(items)
}

/// The longest host name an item's pieces make.
fn longest_name(pieces: &[Piece]) -> usize {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.len(),
            Piece::Group(g) => g
                .iter()
                .map(|r| r.width.max(r.hi.to_string().len()))
                .max()
                .unwrap_or(0),
        })
        .sum()
}

fn expand_item(expr: &str, item: &str, out: &mut Vec<String>) -> Result<(), HostlistError> {
    let mut pieces = Vec::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_string()));
        }
        let close = open
            + rest[open..]
                .find(']')
                .expect("brackets are balanced by split_items");
        pieces.push(Piece::Group(parse_group(expr, &rest[open + 1..close])?));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    let groups: Vec<&Vec<Range>> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Group(g) => Some(g),
            Piece::Text(_) => None,
        })
        .collect();
    let Some((last, leading)) = groups.split_last() else {
        out.push(item.to_string());
        return Ok(());
    };
    // Slurm's limits: a range holds at most MAX_RANGE hosts, and a bracket group before the
    // last one at most MAX_PREFIX_CNT values in all.
    for (i, g) in groups.iter().enumerate() {
        let n: u64 = g.iter().map(Range::count).sum();
        if i + 1 < groups.len() && n > MAX_PREFIX_CNT {
            return Err(err(
                expr,
                format!("a bracket group before the last one has {n} values, more than Slurm's {MAX_PREFIX_CNT}"),
            ));
        }
    }
    let longest = longest_name(&pieces);
    if longest > MAX_NAME {
        return Err(err(
            expr,
            format!("a host name would be {longest} characters long, more than {MAX_NAME}"),
        ));
    }
    let total = groups.iter().fold(1u64, |t, g| {
        t.saturating_mul(g.iter().map(Range::count).sum::<u64>())
    });
    if total.saturating_add(out.len() as u64) > MAX_HOSTS as u64 {
        return Err(err(expr, format!("expands to more than {MAX_HOSTS} hosts")));
    }
    let values = |g: &[Range]| -> Vec<String> {
        g.iter()
            .flat_map(|r| (r.lo..=r.hi).map(move |n| format!("{:0w$}", n, w = r.width)))
            .collect()
    };
    let leading: Vec<Vec<String>> = leading.iter().map(|g| values(g)).collect();
    let last = values(last);
    // Slurm's order (`_push_range_list`): the last group varies fastest; the groups before it
    // are expanded from the one next to it outwards, so the first group comes next, then the
    // second, ..., and the one just before the last varies slowest. With two groups this is
    // the plain product (`rack[1-2]-node[01-02]` → rack1-node01, rack1-node02, rack2-...).
    let mut at = vec![0usize; leading.len()];
    loop {
        for v in &last {
            let mut h = String::new();
            let mut gi = 0;
            for p in &pieces {
                match p {
                    Piece::Text(t) => h.push_str(t),
                    Piece::Group(_) if gi < leading.len() => {
                        h.push_str(&leading[gi][at[gi]]);
                        gi += 1;
                    }
                    Piece::Group(_) => h.push_str(v),
                }
            }
            out.push(h);
        }
        // odometer: the first group is the fastest digit
        let mut i = 0;
        while i < at.len() {
            at[i] += 1;
            if at[i] < leading[i].len() {
                break;
            }
            at[i] = 0;
            i += 1;
        }
        if i == at.len() {
            return Ok(());
        }
    }
}

fn parse_group(expr: &str, body: &str) -> Result<Vec<Range>, HostlistError> {
    if body.is_empty() {
        return Err(err(expr, "empty brackets `[]`"));
    }
    body.split(',')
        .map(|part| parse_range(expr, part))
        .collect()
}

fn parse_range(expr: &str, part: &str) -> Result<Range, HostlistError> {
    let (lo_s, hi_s) = match part.split_once('-') {
        Some((a, b)) => (a, b),
        None => (part, part),
    };
    let num = |s: &str| -> Result<u64, HostlistError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(
                expr,
                format!("`{part}` is not a number or a range of numbers"),
            ));
        }
        if s.len() > 18 {
            return Err(err(expr, format!("number `{s}` is too long")));
        }
        Ok(s.parse().expect("checked digits"))
    };
    let lo = num(lo_s)?;
    let hi = num(hi_s)?;
    if hi < lo {
        return Err(err(expr, format!("range `{part}` runs backwards")));
    }
    if hi - lo >= MAX_RANGE {
        return Err(err(
            expr,
            format!("range `{part}` has more than {MAX_RANGE} hosts, Slurm's limit for one range"),
        ));
    }
    Ok(Range {
        lo,
        hi,
        width: lo_s.len(),
    })
}

/// A run of hosts with one prefix (Slurm's `hostrange`). `num: None` = a host without a
/// trailing number (Slurm's "singlehost").
#[derive(Debug, Clone)]
struct HostRange {
    prefix: String,
    num: Option<Range>,
}

/// Slurm's `_zero_padded`: zeros needed to pad `num` to `width`.
fn zero_padded(num: u64, width: usize) -> usize {
    let digits = num.checked_ilog10().map_or(1, |d| d as usize + 1);
    width.saturating_sub(digits)
}

/// Slurm's `_width_equiv`: are widths `wn` (for n) and `wm` (for m) interchangeable?
/// Adjusts one of them when they are, exactly like Slurm.
fn width_equiv(n: u64, wn: &mut usize, m: u64, wm: &mut usize) -> bool {
    if *wn == *wm {
        return true;
    }
    let npad = zero_padded(n, *wn);
    let nmpad = zero_padded(n, *wm);
    let mpad = zero_padded(m, *wm);
    let mnpad = zero_padded(m, *wn);
    if npad != nmpad && mpad != mnpad {
        false
    } else {
        if npad != nmpad {
            *wm = *wn;
        } else {
            *wn = *wm;
        }
        true
    }
}

fn split_host(host: &str) -> HostRange {
    let digits = host.bytes().rev().take_while(u8::is_ascii_digit).count();
    // Slurm parses the suffix with strtoul; more than 18 digits would not round-trip here.
    if digits == 0 || digits > 18 {
        return HostRange {
            prefix: host.to_string(),
            num: None,
        };
    }
    let (prefix, suffix) = host.split_at(host.len() - digits);
    let n: u64 = suffix.parse().expect("digits");
    HostRange {
        prefix: prefix.to_string(),
        num: Some(Range {
            lo: n,
            hi: n,
            width: digits,
        }),
    }
}

/// Compress host names (or expressions, which are expanded first) into one expression,
/// keeping their order.
pub fn compress<S: AsRef<str>>(hosts: &[S]) -> Result<String, HostlistError> {
    let mut ranges: Vec<HostRange> = Vec::new();
    for h in hosts {
        for host in expand(h.as_ref())? {
            let new = split_host(&host);
            if let (Some(tail), Some(mut nr)) = (ranges.last_mut(), new.num) {
                if let Some(tr) = tail.num.as_mut() {
                    if tail.prefix == new.prefix
                        && tr.hi.checked_add(1) == Some(nr.lo)
                        && width_equiv(tr.lo, &mut tr.width, nr.lo, &mut nr.width)
                    {
                        tr.hi = nr.hi;
                        continue;
                    }
                }
            }
            ranges.push(new);
        }
    }
    let mut out = String::new();
    let mut i = 0;
    while i < ranges.len() {
        if i > 0 {
            out.push(',');
        }
        let same_bracket = |a: &HostRange, b: &HostRange| {
            a.prefix == b.prefix && a.num.is_some() && b.num.is_some()
        };
        let first = &ranges[i];
        let bracket = first.num.is_some_and(|r| r.count() > 1)
            || ranges
                .get(i + 1)
                .is_some_and(|next| same_bracket(first, next));
        out.push_str(&first.prefix);
        if bracket {
            out.push('[');
        }
        loop {
            if let Some(r) = ranges[i].num {
                if r.lo == r.hi {
                    let _ = write!(out, "{:0w$}", r.lo, w = r.width);
                } else {
                    let _ = write!(out, "{:0w$}-{:0w$}", r.lo, r.hi, w = r.width);
                }
            }
            i += 1;
            if i < ranges.len() && same_bracket(&ranges[i - 1], &ranges[i]) {
                out.push(',');
            } else {
                break;
            }
        }
        if bracket {
            out.push(']');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(s: &str) -> Vec<String> {
        expand(s).unwrap()
    }

    #[test]
    fn expands_like_slurm() {
        assert_eq!(ex("node[01-03,7]"), ["node01", "node02", "node03", "node7"]);
        assert_eq!(ex("node[01-3]"), ["node01", "node02", "node03"]);
        assert_eq!(ex("node[1-03]"), ["node1", "node2", "node3"]);
        assert_eq!(
            ex("rack[1-2]-node[01-02]"),
            [
                "rack1-node01",
                "rack1-node02",
                "rack2-node01",
                "rack2-node02"
            ]
        );
        assert_eq!(ex("oss[1,2].local"), ["oss1.local", "oss2.local"]);
        // several groups: the last fastest, then the first, ..., the one before the last slowest
        // (what `scontrol show hostnames` prints)
        assert_eq!(
            ex("row[0,1]_rack[2-3]_blade[4,5]"),
            [
                "row0_rack2_blade4",
                "row0_rack2_blade5",
                "row1_rack2_blade4",
                "row1_rack2_blade5",
                "row0_rack3_blade4",
                "row0_rack3_blade5",
                "row1_rack3_blade4",
                "row1_rack3_blade5"
            ]
        );
        assert_eq!(
            ex("a[1-2]b[1-2]c[1-2]d[1-2]").join(" "),
            "a1b1c1d1 a1b1c1d2 a2b1c1d1 a2b1c1d2 a1b2c1d1 a1b2c1d2 a2b2c1d1 a2b2c1d2 \
             a1b1c2d1 a1b1c2d2 a2b1c2d1 a2b1c2d2 a1b2c2d1 a1b2c2d2 a2b2c2d1 a2b2c2d2"
        );
        assert_eq!(ex("node[1,1]"), ["node1", "node1"]);
        assert_eq!(ex("b,a  c,,d"), ["b", "a", "c", "d"]);
        assert_eq!(ex("node[9-10]"), ["node9", "node10"]);
        assert_eq!(ex("[1-2]"), ["1", "2"]);
        assert!(ex("").is_empty());
    }

    #[test]
    fn rejects_bad_expressions() {
        for bad in [
            "node[3-1]",
            "gpu-[a1-2]",
            "node[1-3",
            "node1-3]",
            "node[]",
            "n[1[2]]",
            "n[1,,2]",
            "n[-2]",
            "n[1-]",
        ] {
            let e = expand(bad).unwrap_err();
            assert_eq!(e.expr, bad);
        }
        assert!(expand("n[0-99999999]")
            .unwrap_err()
            .reason
            .contains("more than"));
        assert!(expand("a[0-999]b[0-999]c[0-9]")
            .unwrap_err()
            .reason
            .contains("more than"));
        // Slurm's per-range and per-group limits
        assert_eq!(ex("n[0-65535]").len(), 65536);
        assert!(expand("n[0-65536]").unwrap_err().reason.contains("65536"));
        assert!(expand("n[1-1000000]").is_err());
        assert_eq!(ex("a[1-40000,40001-65536]b[1]").len(), 65536);
        assert!(expand("a[1-40000,40001-65537]b[1]").is_err());
        assert_eq!(ex("n[0-65535,65536-131071]").len(), 131072);
    }

    #[test]
    fn compresses_like_slurm() {
        let c = |v: &[&str]| compress(v).unwrap();
        assert_eq!(c(&["node3", "node1", "node2"]), "node[3,1-2]");
        assert_eq!(c(&["node01", "node02", "node03"]), "node[01-03]");
        assert_eq!(c(&["node9", "node10"]), "node[9-10]");
        assert_eq!(c(&["node1", "node02"]), "node[1,02]");
        assert_eq!(c(&["node1"]), "node1");
        assert_eq!(c(&["login", "node1", "node2"]), "login,node[1-2]");
        assert_eq!(c(&["node1", "login", "node2"]), "node1,login,node2");
        assert_eq!(c(&["node1", "node1"]), "node[1,1]");
        assert_eq!(c(&["oss1.local", "oss2.local"]), "oss1.local,oss2.local");
        assert_eq!(c(&["node[1-3]", "node4"]), "node[1-4]");
    }
}
