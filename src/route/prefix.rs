//! What the prefix policy remembers: which replica last got each prompt prefix
//! (and each client-given session key), in a memory bound fixed at start. Pure: no I/O, no
//! clock; the router holds one [`Index`] for all its models behind a lock (a lookup keeps
//! only the replicas of the request's model).
//!
//! A prompt is its body's `messages` (chat) or `prompt` (completions) as the client's JSON
//! spells it: requests that share leading messages share a leading run of that text, with no
//! tokenizer. The text is cut into [`BLOCK`]-byte blocks and each *whole* block ends a prefix
//! whose hash is the hash of everything before it (one keyed SipHash pass, read at each
//! block's end), so a lookup walks the blocks until the first one nobody has seen: the
//! longest remembered prefix, in one hash-map probe per block, whatever the replica count.
//! Eviction is two generations: inserts go to the young map; when it is full the old one is
//! dropped and the young one becomes old. What was used in the last generation survives, at
//! most two generations' worth is held, and the maps are sized once from the byte budget.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// Bytes of prompt text per block: about 32 tokens; a prompt shorter than one block is
/// routed by load alone (it has little to reuse).
pub const BLOCK: usize = 128;

/// The keys are already keyed SipHash outputs: the map needs no second hash.
#[derive(Default)]
pub struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<u64, u32, BuildHasherDefault<Identity>>;

/// The request's keys: its session (if the client gave one) and its prefixes, shortest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    pub session: Option<u64>,
    pub prefixes: Vec<u64>,
}

/// Where a request would find its cache: the replica holding its session, and the replicas
/// holding its longest prefixes (longest first, at most one entry per replica).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub session: Option<usize>,
    /// (replica, blocks matched).
    pub prefixes: Vec<(usize, usize)>,
}

pub struct Index {
    young: Map,
    old: Map,
    /// Entries per generation.
    cap: usize,
}

/// Turns prompts and session keys into [`Keys`], with a key of its own (random per router),
/// outside the index's lock.
#[derive(Default)]
pub struct Keyer(std::collections::hash_map::RandomState);

impl Keyer {
    /// The keys of a prompt's text and a client's session key.
    pub fn keys(&self, prompt: &[u8], session: Option<&[u8]>) -> Keys {
        let mut h = self.0.build_hasher();
        let mut prefixes = Vec::with_capacity(prompt.len() / BLOCK);
        for block in prompt.chunks_exact(BLOCK) {
            h.write(block);
            prefixes.push(h.finish());
        }
        let session = session.map(|s| {
            let mut h = self.0.build_hasher();
            h.write(b"session\0");
            h.write(s);
            h.finish()
        });
        Keys { session, prefixes }
    }
}

/// The bytes one map entry takes at most, its share of the table's empty slots included
/// (hashbrown: a 16-byte slot and a control byte, a table at most 7/8 full, sized to a power
/// of two).
const ENTRY_BYTES: usize = 17;

impl Index {
    /// An index that holds at most `budget` bytes (both generations, tables included).
    pub fn new(budget: usize) -> Index {
        // the largest power-of-two table that fits twice in the budget, used to 7/8
        let mut buckets = 16usize;
        while buckets * 2 * 2 * ENTRY_BYTES <= budget {
            buckets *= 2;
        }
        let cap = buckets / 8 * 7;
        Index {
            young: Map::with_capacity_and_hasher(cap, BuildHasherDefault::default()),
            old: Map::with_capacity_and_hasher(cap, BuildHasherDefault::default()),
            cap,
        }
    }

    /// Entries held at most (both generations).
    pub fn capacity(&self) -> usize {
        self.cap * 2
    }

    /// The bytes the two tables take.
    pub fn bytes(&self) -> usize {
        (self.young.capacity() + self.old.capacity()) / 7 * 8 * ENTRY_BYTES
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, k: u64) -> Option<usize> {
        self.young
            .get(&k)
            .or_else(|| self.old.get(&k))
            .map(|&r| r as usize)
    }

    /// Who holds the request's session and prefixes.
    pub fn find(&self, keys: &Keys) -> Found {
        let session = keys.session.and_then(|k| self.get(k));
        let mut prefixes: Vec<(usize, usize)> = Vec::new();
        for (depth, &k) in keys.prefixes.iter().enumerate() {
            let Some(r) = self.get(k) else { break };
            match prefixes.iter_mut().find(|(x, _)| *x == r) {
                Some(e) => e.1 = depth + 1,
                None => prefixes.push((r, depth + 1)),
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.1));
        Found { session, prefixes }
    }

    /// The request went to `replica`: it now holds the session and every prefix.
    pub fn record(&mut self, keys: &Keys, replica: usize) {
        let r = u32::try_from(replica).unwrap_or(u32::MAX);
        for &k in keys.session.iter().chain(&keys.prefixes) {
            if self.young.len() >= self.cap {
                // the young generation is full: the old one goes, the young one ages
                self.old.clear();
                std::mem::swap(&mut self.young, &mut self.old);
            }
            self.young.insert(k, r);
        }
    }

    /// A replica restarted (its cache is empty): what pointed at it is forgotten lazily, by
    /// sending nothing its way for that reason (entries are overwritten as requests go).
    pub fn forget(&mut self, replica: usize) {
        let r = u32::try_from(replica).unwrap_or(u32::MAX);
        self.young.retain(|_, v| *v != r);
        self.old.retain(|_, v| *v != r);
    }
}

/// The parts of an OpenAI request body the prefix policy reads, borrowed from the body.
#[derive(serde::Deserialize)]
struct Prompted<'a> {
    #[serde(borrow, default)]
    messages: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    user: Option<std::borrow::Cow<'a, str>>,
}

/// A body's prompt text (the JSON of its `messages`, `prompt` or `input`) and its `user`
/// field; `None` for a body that is not a JSON object.
pub fn prompt_of(body: &[u8]) -> Option<(&[u8], Option<String>)> {
    // serde reads a struct from an array too: an OpenAI body is an object
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let p: Prompted<'_> = serde_json::from_slice(body).ok()?;
    let text = p
        .messages
        .or(p.prompt)
        .or(p.input)
        .map_or(&b""[..], |r| r.get().as_bytes());
    Some((text, p.user.map(std::borrow::Cow::into_owned)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(system: &str, turns: &[&str]) -> Vec<u8> {
        let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
        for t in turns {
            messages.push(serde_json::json!({"role": "user", "content": t}));
        }
        serde_json::to_vec(
            &serde_json::json!({"model": "m", "max_tokens": 4, "messages": messages}),
        )
        .unwrap()
    }

    fn keys(k: &Keyer, body: &[u8]) -> Keys {
        let (text, user) = prompt_of(body).unwrap();
        k.keys(text, user.as_deref().map(str::as_bytes))
    }

    #[test]
    fn a_shared_system_prompt_is_found_where_it_went() {
        let (mut ix, kr) = (Index::new(1 << 20), Keyer::default());
        let system = "You are a careful assistant. ".repeat(20); // ~580 bytes: 4 blocks
        let a = keys(&kr, &chat(&system, &["first question"]));
        assert!(a.prefixes.len() >= 4, "{}", a.prefixes.len());
        assert_eq!(ix.find(&a), Found::default());
        ix.record(&a, 2);
        // another question after the same system prompt: the blocks before the question match
        let b = keys(
            &kr,
            &chat(&system, &["a different one, longer than the first"]),
        );
        let f = ix.find(&b);
        assert_eq!(f.prefixes.len(), 1);
        assert_eq!(f.prefixes[0].0, 2);
        assert!(f.prefixes[0].1 >= 4, "{f:?}");
        // another system prompt: nothing
        let c = keys(&kr, &chat(&"Be brief. ".repeat(60), &["first question"]));
        assert_eq!(ix.find(&c).prefixes, vec![]);
        // other fields (temperature, max_tokens) do not matter, only the prompt
        let mut v: serde_json::Value = serde_json::from_slice(&chat(&system, &["x"])).unwrap();
        v["temperature"] = 0.3.into();
        let d = keys(&kr, &serde_json::to_vec(&v).unwrap());
        assert_eq!(ix.find(&d).prefixes[0].0, 2);
    }

    #[test]
    fn the_longest_match_comes_first_one_entry_per_replica() {
        let (mut ix, kr) = (Index::new(1 << 20), Keyer::default());
        let base = "x".repeat(BLOCK * 2);
        let long = format!("{base}{}", "y".repeat(BLOCK * 3));
        let short_k = kr.keys(base.as_bytes(), None);
        let long_k = kr.keys(long.as_bytes(), None);
        ix.record(&long_k, 0);
        ix.record(&short_k, 1); // replica 1 got the first two blocks later
        let f = ix.find(&long_k);
        assert_eq!(f.prefixes, vec![(0, 5), (1, 2)]);
        // a partial last block is not a key
        assert_eq!(
            kr.keys(&long.as_bytes()[..BLOCK * 2 + 5], None)
                .prefixes
                .len(),
            2
        );
        assert_eq!(kr.keys(b"short", None).prefixes, Vec::<u64>::new());
    }

    #[test]
    fn a_session_key_finds_its_replica() {
        let (mut ix, kr) = (Index::new(1 << 20), Keyer::default());
        let mut v: serde_json::Value = serde_json::from_slice(&chat("hi", &["q"])).unwrap();
        v["user"] = "alice".into();
        let body = serde_json::to_vec(&v).unwrap();
        let k = keys(&kr, &body);
        assert!(k.session.is_some());
        ix.record(&k, 1);
        assert_eq!(ix.find(&k).session, Some(1));
        // the header's key and the body's are the same kind of key
        let h = kr.keys(b"", Some(b"alice"));
        assert_eq!(ix.find(&h).session, Some(1));
        assert_eq!(ix.find(&kr.keys(b"", Some(b"bob"))).session, None);
    }

    #[test]
    fn memory_stays_within_the_budget_whatever_the_traffic() {
        for budget in [64 << 10, 1 << 20, 4 << 20] {
            let mut ix = Index::new(budget);
            let before = ix.bytes();
            assert!(before <= budget, "{before} > {budget}");
            for i in 0..200_000u64 {
                let k = Keys {
                    session: None,
                    prefixes: vec![i.wrapping_mul(0x9e37_79b9_7f4a_7c15)],
                };
                ix.record(&k, (i % 7) as usize);
            }
            assert!(ix.len() <= ix.capacity());
            assert_eq!(ix.bytes(), before, "the tables never grew");
            assert!(ix.bytes() <= budget);
        }
    }

    #[test]
    fn what_was_used_lately_survives_eviction() {
        let mut ix = Index::new(4096);
        let cap = ix.capacity() / 2;
        let hot = Keys {
            session: None,
            prefixes: vec![1],
        };
        ix.record(&hot, 3);
        for i in 0..(cap as u64 * 5) {
            // the hot prefix is asked for again every few requests
            if i % (cap as u64 / 2) == 0 {
                assert_eq!(ix.find(&hot).prefixes, vec![(3, 1)], "at {i}");
                ix.record(&hot, 3);
            }
            ix.record(
                &Keys {
                    session: None,
                    prefixes: vec![1000 + i],
                },
                0,
            );
        }
        // one asked for once, long ago, is gone
        assert_eq!(
            ix.find(&Keys {
                session: None,
                prefixes: vec![1000]
            }),
            Found::default()
        );
    }

    #[test]
    fn forget_drops_a_replicas_entries() {
        let (mut ix, kr) = (Index::new(1 << 16), Keyer::default());
        let k = kr.keys(&[b'a'; BLOCK * 2], None);
        ix.record(&k, 4);
        ix.forget(4);
        assert_eq!(ix.find(&k), Found::default());
    }

    #[test]
    fn prompts_of_each_kind_and_bodies_that_are_not_json() {
        let (t, u) = prompt_of(br#"{"model":"m","prompt":"once upon","user":"u1"}"#).unwrap();
        assert_eq!(t, br#""once upon""#);
        assert_eq!(u.as_deref(), Some("u1"));
        let (t, _) = prompt_of(br#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(t, br#"[{"role":"user","content":"hi"}]"#);
        let (t, _) = prompt_of(br#"{"input":["a","b"]}"#).unwrap();
        assert_eq!(t, br#"["a","b"]"#);
        assert_eq!(prompt_of(b"{}").unwrap().0, b"");
        assert!(prompt_of(b"not json").is_none());
        assert!(prompt_of(b"[1,2]").is_none());
        // a non-string user: not a session
        assert!(prompt_of(br#"{"user": 5}"#).is_none());
    }
}
