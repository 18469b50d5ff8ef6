//! The batch input: OpenAI's batch format, one request per line, read as a stream (never
//! loaded whole). Validation names the line (and both lines of a duplicate `custom_id`).

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

/// The endpoints a batch line may name (those of OpenAI's batch API that the engines serve).
pub const URLS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
/// The longest line read (a request with long documents or many few-shot examples).
pub const MAX_LINE: usize = 16 << 20;
/// The longest `custom_id`.
pub const MAX_ID: usize = 1024;

/// A `custom_id` as held in memory: 16 bytes of its SHA-256, so that duplicate detection and
/// the resume set cost 16 bytes per line whatever the ids look like (a collision between
/// two ids of one file has a chance near 2^-64 at a billion lines).
pub type IdHash = u128;

pub fn id_hash(id: &str) -> IdHash {
    let d = Sha256::digest(id.as_bytes());
    u128::from_be_bytes(d[..16].try_into().expect("16 bytes"))
}

/// Which lines this process handles: all, or line numbers (1-based, blank lines counted)
/// with `(line - 1) % count == index` (a job array's task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };
    pub fn takes(self, line: u64) -> bool {
        (line - 1) % u64::from(self.count) == u64::from(self.index)
    }
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("shard `{s}` is not INDEX/COUNT (e.g. 0/4)"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("shard index `{i}` is not a number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("shard count `{n}` is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!(
                "shard {index}/{count}: the index must be below the count"
            ));
        }
        Ok(Shard { index, count })
    }
}

/// One request line, as sent: its id, where it goes, and the body's bytes untouched.
#[derive(Debug)]
pub struct Request {
    pub line: u64,
    pub custom_id: String,
    pub url: String,
    pub body: Box<RawValue>,
    pub model: String,
}

#[derive(Deserialize)]
struct Wire {
    custom_id: Option<serde_json::Value>,
    method: Option<serde_json::Value>,
    url: Option<serde_json::Value>,
    body: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct BodyModel {
    model: Option<serde_json::Value>,
    stream: Option<serde_json::Value>,
}

/// One line → a request, or what is wrong with it (without the line number).
pub fn parse_line(line: u64, text: &[u8]) -> Result<Request, String> {
    if text.trim_ascii_start().first() != Some(&b'{') {
        return Err(
            if serde_json::from_slice::<serde_json::Value>(text).is_ok() {
                "not a JSON object".into()
            } else {
                "not valid JSON (a line holds one request object)".into()
            },
        );
    }
    let w: Wire = serde_json::from_slice(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let (custom_id, url) = envelope(w.custom_id, w.method, w.url)?;
    let body = w.body.ok_or("body is missing")?;
    let model = body_model(&body)?;
    Ok(Request {
        line,
        custom_id,
        url,
        body,
        model,
    })
}

/// The batch envelope: a non-empty `custom_id`, `POST`, a supported `url`.
fn envelope(
    custom_id: Option<serde_json::Value>,
    method: Option<serde_json::Value>,
    url: Option<serde_json::Value>,
) -> Result<(String, String), String> {
    let custom_id = match custom_id {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(serde_json::Value::String(_)) => return Err("custom_id is empty".into()),
        Some(_) => return Err("custom_id is not a string".into()),
        None => return Err("custom_id is missing".into()),
    };
    if custom_id.len() > MAX_ID {
        return Err(format!("custom_id is longer than {MAX_ID} bytes"));
    }
    match method {
        Some(serde_json::Value::String(m)) if m == "POST" => {}
        Some(m) => return Err(format!("method {m} is not \"POST\"")),
        None => return Err("method is missing (want \"POST\")".into()),
    }
    let url = match url {
        Some(serde_json::Value::String(u)) if URLS.contains(&u.as_str()) => u,
        Some(u) => return Err(format!("url {u} is not one of {}", URLS.join(", "))),
        None => return Err(format!("url is missing (one of {})", URLS.join(", "))),
    };
    Ok((custom_id, url))
}

/// The request body: an object naming its model, not streamed.
fn body_model(body: &RawValue) -> Result<String, String> {
    let b: BodyModel = serde_json::from_str(body.get()).map_err(|_| "body is not a JSON object")?;
    if b.stream
        .is_some_and(|v| v != serde_json::Value::Bool(false))
    {
        return Err("body.stream is set: batch answers are not streamed (drop it)".into());
    }
    match b.model {
        Some(serde_json::Value::String(m)) if !m.is_empty() => Ok(m),
        Some(_) => Err("body.model is not a model name".into()),
        None => Err("body.model is missing".into()),
    }
}

/// Lines of a file, each with its number; a line longer than [`MAX_LINE`] is an error.
pub struct Lines<R> {
    reader: R,
    line: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    pub fn new(reader: R) -> Self {
        Lines {
            reader,
            line: 0,
            buf: Vec::new(),
        }
    }

    /// The next line's number and bytes (without the newline); `None` at the end.
    pub fn next_line(&mut self) -> Result<Option<(u64, &[u8])>, String> {
        self.buf.clear();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| format!("cannot read line {}: {e}", self.line + 1))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        } else if self.buf.len() > MAX_LINE {
            return Err(format!(
                "line {} is longer than {} MiB",
                self.line,
                MAX_LINE >> 20
            ));
        }
        Ok(Some((self.line, &self.buf)))
    }
}

pub fn blank(text: &[u8]) -> bool {
    text.iter().all(u8::is_ascii_whitespace)
}

/// What a valid input holds (for this shard).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub requests: u64,
    pub per_model: std::collections::BTreeMap<String, u64>,
    /// Of those, already in OUT / in OUT.errors (an earlier run's).
    pub answered: u64,
    pub failed: u64,
}

/// The ids an earlier run wrote: to OUT (answered) and to OUT.errors (failed for good).
#[derive(Debug, Default)]
pub struct Known {
    pub answered: std::collections::HashSet<IdHash>,
    pub failed: std::collections::HashSet<IdHash>,
}

impl Known {
    pub fn contains(&self, h: &IdHash) -> bool {
        self.answered.contains(h) || self.failed.contains(h)
    }
}

/// Read the whole input once: every line of the shard well-formed, ids unique (across the
/// whole file: shards of one input must not share an id), models among `models` (any model
/// when empty). The first problem, naming its line, is the error.
pub fn validate(
    path: &Path,
    models: &[String],
    shard: Shard,
    known: &Known,
) -> Result<Summary, String> {
    let shown = path.display();
    let f = open(path)?;
    let mut lines = Lines::new(std::io::BufReader::with_capacity(1 << 20, f));
    let mut seen: HashMap<IdHash, u64> = HashMap::new();
    let mut sum = Summary::default();
    while let Some((line, text)) = lines.next_line().map_err(|e| format!("{shown}: {e}"))? {
        if blank(text) {
            continue;
        }
        let r = parse_line(line, text).map_err(|e| format!("{shown} line {line}: {e}"))?;
        let h = id_hash(&r.custom_id);
        if let Some(first) = seen.insert(h, line) {
            return Err(format!(
                "{shown} lines {first} and {line}: custom_id {:?} appears twice",
                r.custom_id
            ));
        }
        if !shard.takes(line) {
            continue;
        }
        if !models.is_empty() && !models.contains(&r.model) {
            return Err(format!(
                "{shown} line {line}: model {:?} is not served by this job (it serves {})",
                r.model,
                models.join(", ")
            ));
        }
        sum.requests += 1;
        sum.answered += u64::from(known.answered.contains(&h));
        sum.failed += u64::from(!known.answered.contains(&h) && known.failed.contains(&h));
        *sum.per_model.entry(r.model).or_default() += 1;
    }
    Ok(sum)
}

/// The input for reading: a regular file (not a FIFO or a device that could block forever).
pub fn open(path: &Path) -> Result<std::fs::File, String> {
    let shown = path.display();
    let f = std::fs::File::open(path)
        .map_err(|e| format!("cannot open the batch input {shown}: {e}"))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("the batch input {shown} is not a regular file"));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const OK: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"model":"tiny","prompt":"x"}}"#;

    fn line(id: &str, url: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"{url}","body":{{"model":"{model}","prompt":"x"}}}}"#
        )
    }

    #[test]
    fn a_good_file_is_counted_per_model_and_blank_lines_are_skipped() {
        let text = format!(
            "{}\n\n{}\n{}\n",
            line("a", "/v1/completions", "tiny"),
            line("b", "/v1/chat/completions", "judge"),
            line("c", "/v1/embeddings", "tiny")
        );
        let f = file(&text);
        let s = validate(
            f.path(),
            &["tiny".into(), "judge".into()],
            Shard::ALL,
            &Known::default(),
        )
        .unwrap();
        assert_eq!(s.requests, 3);
        assert_eq!(s.per_model["tiny"], 2);
    }

    #[test]
    fn each_problem_names_its_line() {
        let cases = [
            ("{not json", "line 2: not valid JSON"),
            ("[1,2]", "line 2: not a JSON object"),
            (
                r#"{"method":"POST","url":"/v1/completions","body":{"model":"tiny"}}"#,
                "line 2: custom_id is missing",
            ),
            (
                r#"{"custom_id":7,"method":"POST","url":"/v1/completions","body":{"model":"tiny"}}"#,
                "custom_id is not a string",
            ),
            (
                r#"{"custom_id":"z","method":"GET","url":"/v1/completions","body":{"model":"tiny"}}"#,
                "method \"GET\" is not \"POST\"",
            ),
            (
                r#"{"custom_id":"z","method":"POST","url":"/v1/responses","body":{"model":"tiny"}}"#,
                "url \"/v1/responses\" is not one of",
            ),
            (
                r#"{"custom_id":"z","method":"POST","url":"/v1/completions"}"#,
                "body is missing",
            ),
            (
                r#"{"custom_id":"z","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
                "body.model is missing",
            ),
            (
                r#"{"custom_id":"z","method":"POST","url":"/v1/completions","body":{"model":"tiny","stream":true}}"#,
                "body.stream is set",
            ),
            (
                r#"{"custom_id":"z","method":"POST","url":"/v1/completions","body":{"model":"llama"}}"#,
                "line 2: model \"llama\" is not served by this job (it serves tiny)",
            ),
            (OK, "lines 1 and 2: custom_id \"a\" appears twice"),
        ];
        for (bad, want) in cases {
            let f = file(&format!("{OK}\n{bad}\n"));
            let e =
                validate(f.path(), &["tiny".into()], Shard::ALL, &Known::default()).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn shards_split_by_line_number_and_ids_stay_unique_across_them() {
        let text: String = (1..=5)
            .map(|i| line(&format!("r{i}"), "/v1/completions", "tiny") + "\n")
            .collect();
        let f = file(&text);
        let a = validate(
            f.path(),
            &[],
            Shard::parse("0/2").unwrap(),
            &Known::default(),
        )
        .unwrap();
        let b = validate(
            f.path(),
            &[],
            Shard::parse("1/2").unwrap(),
            &Known::default(),
        )
        .unwrap();
        assert_eq!((a.requests, b.requests), (3, 2));
        // a duplicate in the other shard's lines is still a duplicate
        let f = file(&format!(
            "{}\n{}\n",
            line("x", "/v1/completions", "tiny"),
            line("x", "/v1/completions", "tiny")
        ));
        assert!(validate(
            f.path(),
            &[],
            Shard::parse("0/2").unwrap(),
            &Known::default()
        )
        .is_err());
        assert!(
            Shard::parse("2/2").is_err()
                && Shard::parse("0/0").is_err()
                && Shard::parse("1").is_err()
        );
    }

    #[test]
    fn a_line_over_the_cap_and_a_fifo_are_refused() {
        let long = format!(r#"{{"custom_id":"{}"}}"#, "x".repeat(MAX_LINE));
        let f = file(&format!("{OK}\n{long}\n"));
        let e = validate(f.path(), &[], Shard::ALL, &Known::default()).unwrap_err();
        assert!(e.contains("line 2 is longer than 16 MiB"), "{e}");
        let e = validate(Path::new("/dev/null"), &[], Shard::ALL, &Known::default()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = validate(
            Path::new("/nonexistent/in.jsonl"),
            &[],
            Shard::ALL,
            &Known::default(),
        )
        .unwrap_err();
        assert!(e.contains("cannot open the batch input"), "{e}");
    }
}
