//! Hostlists against the real `scontrol` (Debian's slurm-client; the test setup installs it),
//! on a few hundred generated expressions and host lists, plus a round-trip property test.
//! 22.05's scontrol rejects text after the last bracket, so generated expressions avoid it.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use ray_launch::input::hostlist::{compress, expand};
use std::path::Path;
use std::process::Command;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len() as u64) as usize]
    }
}

fn scontrol(args: &[&str]) -> (String, String) {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm/oracle-slurm.conf");
    let out = Command::new("scontrol")
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .expect("scontrol runs: install Debian's slurm-client (scripts/setup.sh does)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn number(r: &mut Lcg) -> String {
    let n = r.below(25);
    match r.below(4) {
        0 => format!("{n:02}"),
        1 => format!("{n:03}"),
        _ => n.to_string(),
    }
}

fn gen_expr(r: &mut Lcg) -> String {
    let prefixes = ["node", "gpu-", "n", "rack1-n", "c", "x1y"];
    let mut items = Vec::new();
    for _ in 0..=r.below(3) {
        let mut item = r.pick(&prefixes).to_string();
        if r.below(5) == 0 {
            item.push_str(&number(r));
        } else {
            for g in 0..=(r.below(4) / 3) {
                if g > 0 {
                    item.push_str(r.pick(&["-", "s", "-r"]));
                }
                let mut parts = Vec::new();
                for _ in 0..=r.below(3) {
                    let lo = number(r);
                    let lon: u64 = lo.parse().unwrap();
                    if r.below(2) == 0 {
                        parts.push(lo);
                    } else {
                        let hi = lon + r.below(12);
                        let his = if r.below(3) == 0 {
                            format!("{hi:02}")
                        } else {
                            hi.to_string()
                        };
                        parts.push(format!("{lo}-{his}"));
                    }
                }
                item.push_str(&format!("[{}]", parts.join(",")));
            }
        }
        items.push(item);
    }
    items.join(",")
}

#[test]
fn expand_matches_scontrol() {
    let mut r = Lcg(7);
    let mut checked = 0;
    for _ in 0..300 {
        let e = gen_expr(&mut r);
        let (out, err) = scontrol(&["show", "hostnames", &e]);
        let want: Vec<String> = out.lines().map(str::to_string).collect();
        assert!(err.is_empty(), "scontrol rejected generated `{e}`: {err}");
        assert_eq!(expand(&e).unwrap(), want, "expression `{e}`");
        checked += 1;
    }
    assert_eq!(checked, 300);
}

/// A seeded differential test against the real `scontrol` (Slurm 22.05 here) on 2,400 generated
/// expressions: one to four bracket groups, zero padding, mixed lists of plain hosts and
/// ranges, ranges near and over Slurm's 65,536-host limit (which both must refuse), and for
/// every accepted expression the compressed form of its hosts (`scontrol show hostlist`) and
/// the round trip. Generated forms avoid what releases disagree on: text after the last
/// bracket and adjacent groups (`n[1-2][3-4]`).
#[test]
fn differential_against_scontrol() {
    let mut r = Lcg(2026);
    let (mut multi, mut refused, mut large, mut compressed) = (0, 0, 0, 0);
    const N: usize = 2400;
    for _ in 0..N {
        let (e, several) = gen_rich(&mut r);
        let (out, err) = scontrol(&["show", "hostnames", &e]);
        let ours = expand(&e);
        if !err.is_empty() {
            assert!(err.contains("Invalid"), "scontrol on `{e}`: {err}");
            assert!(
                ours.is_err(),
                "scontrol refused `{e}` ({err}), we expanded it"
            );
            refused += 1;
            continue;
        }
        let want: Vec<String> = out.lines().map(str::to_string).collect();
        let ours = ours.unwrap_or_else(|x| panic!("we refused `{e}` ({x}), scontrol did not"));
        assert!(
            ours == want,
            "expression `{e}`: ours {} hosts, scontrol {}; first difference at {:?}",
            ours.len(),
            want.len(),
            ours.iter().zip(&want).position(|(a, b)| a != b)
        );
        if several {
            multi += 1;
        }
        if want.len() > 1000 {
            large += 1;
        }
        if want.len() <= 3000 {
            let joined = want.join(",");
            let (c, cerr) = scontrol(&["show", "hostlist", &joined]);
            assert!(cerr.is_empty(), "{cerr}");
            let ours_c = compress(&want).unwrap();
            assert_eq!(ours_c, c.trim(), "compress of the hosts of `{e}`");
            assert_eq!(expand(&ours_c).unwrap(), want, "round trip of `{e}`");
            compressed += 1;
        }
    }
    eprintln!("{N} expressions: {multi} with several groups, {refused} refused by both, {large} over 1000 hosts, {compressed} compressed");
    // the generator must keep covering each kind
    assert!(
        multi >= 500 && refused >= 100 && large >= 50 && compressed >= 1500,
        "multi {multi}, refused {refused}, large {large}, compressed {compressed}"
    );
}

fn padded(r: &mut Lcg, n: u64) -> String {
    match r.below(5) {
        0 => format!("{n:02}"),
        1 => format!("{n:03}"),
        2 => format!("{n:04}"),
        _ => n.to_string(),
    }
}

/// One bracket group; `big` allows ranges near Slurm's 65,536-host limit.
fn gen_group(r: &mut Lcg, big: bool) -> String {
    let mut parts = Vec::new();
    for _ in 0..=r.below(3) {
        let lo = r.below(if big { 200 } else { 120 });
        let los = padded(r, lo);
        match r.below(if big { 4 } else { 3 }) {
            0 => parts.push(los),
            1 | 2 => {
                let hi = lo + r.below(if big { 3000 } else { 6 });
                parts.push(format!("{los}-{}", padded(r, hi)));
            }
            _ => {
                // around the limit: 65,530 .. 65,542 hosts
                let hi = lo + 65_529 + r.below(13);
                parts.push(format!("{los}-{hi}"));
            }
        }
    }
    if !big && r.below(120) == 0 {
        // backwards: both refuse
        parts.push("9-3".into());
    }
    format!("[{}]", parts.join(","))
}

/// An expression, and whether one of its items has several bracket groups.
fn gen_rich(r: &mut Lcg) -> (String, bool) {
    let prefixes = ["node", "gpu-", "n", "rack1-n", "c", "x1y", "row", "a.b-"];
    let joins = ["-", "s", "_r", ".", "-blade", "x"];
    let mut items = Vec::new();
    let mut several = false;
    for _ in 0..=r.below(4) {
        let mut item = r.pick(&prefixes).to_string();
        match r.below(12) {
            0 => {}
            1 => {
                let n = r.below(50);
                item.push_str(&padded(r, n));
            }
            2 => item.push_str(&gen_group(r, true)),
            _ => {
                let groups = 1 + r.below(4);
                several |= groups > 1;
                for g in 0..groups {
                    if g > 0 {
                        item.push_str(r.pick(&joins));
                    }
                    item.push_str(&gen_group(r, false));
                }
            }
        }
        items.push(item);
    }
    let sep = if r.below(8) == 0 { " " } else { "," };
    (items.join(sep), several)
}

#[test]
fn both_reject_invalid_expressions() {
    for e in [
        "node[3-1]",
        "gpu-[a1-2]",
        "n[]",
        "n[1,,2]",
        "n[1-2-3]",
        "n[x]",
        "n[-1]",
    ] {
        let (_, err) = scontrol(&["show", "hostnames", e]);
        assert!(err.contains("Invalid"), "scontrol accepted `{e}`");
        assert!(expand(e).is_err(), "we accepted `{e}`");
    }
}

#[test]
fn compress_matches_scontrol() {
    let mut r = Lcg(11);
    for _ in 0..300 {
        let mut hosts: Vec<String> = Vec::new();
        let len = 1 + r.below(12);
        let mut next = r.below(20);
        for _ in 0..len {
            let prefix = r.pick(&["node", "node", "gpu", "login", "n1-"]);
            let h = match r.below(6) {
                0 => prefix.to_string(),
                1 => format!("{prefix}{:02}", next),
                _ => format!("{prefix}{next}"),
            };
            hosts.push(h);
            next = match r.below(4) {
                0 => r.below(30),
                _ => next + 1,
            };
        }
        let joined = hosts.join(",");
        let (out, err) = scontrol(&["show", "hostlist", &joined]);
        assert!(err.is_empty(), "{err}");
        assert_eq!(compress(&hosts).unwrap(), out.trim(), "hosts {joined}");
    }
}

mod roundtrip {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn expand_of_compress_is_identity(hosts in proptest::collection::vec(
            (prop_oneof!["node", "gpu-", "n1-", "login", "a\\.b"], 0u64..40, 0usize..3, any::<bool>()),
            1..30,
        )) {
            let names: Vec<String> = hosts.iter().map(|(p, n, w, plain)| {
                if *plain && p.ends_with('n') { p.to_string() } else { format!("{p}{n:0w$}", w = *w) }
            }).collect();
            let c = compress(&names).unwrap();
            prop_assert_eq!(expand(&c).unwrap(), names);
        }
    }
}
