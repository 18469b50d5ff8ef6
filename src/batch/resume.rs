//! The output files, read back at the start: a torn last line (a launcher killed mid-write)
//! is cut off, and every `custom_id` already there is done. What is in OUT or OUT.errors is
//! never sent again; what is not there is sent (again).

use super::input::{id_hash, IdHash, Lines, Shard};
use std::collections::HashSet;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Where the answers go: OUT, and OUT's `.errors` sibling (`out.jsonl` → `out.errors.jsonl`);
/// a shard of a job array writes its own pair (`out.shard-3-of-8.jsonl`, ...).
pub fn paths(output: &Path, shard: Shard) -> (PathBuf, PathBuf) {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.strip_suffix(".jsonl") {
        Some(s) => (s.to_string(), ".jsonl"),
        None => (name.clone(), ""),
    };
    let stem = if shard.count > 1 {
        format!("{stem}.shard-{}-of-{}", shard.index, shard.count)
    } else {
        stem
    };
    (
        output.with_file_name(format!("{stem}{ext}")),
        output.with_file_name(format!(
            "{stem}.errors{}",
            if ext.is_empty() { ".jsonl" } else { ext }
        )),
    )
}

/// What one output file holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadBack {
    pub lines: u64,
    /// Bytes cut off the end: a last line without its newline.
    pub cut: u64,
}

/// Read `path` (if it exists) into `done`; cut a torn last line off (the file is opened for
/// writing only to truncate it). A complete line that is not an answer is an error: the file
/// is not this batch's output.
pub fn read_back(path: &Path, done: &mut HashSet<IdHash>) -> Result<ReadBack, String> {
    let shown = path.display();
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ReadBack::default()),
        Err(e) => return Err(format!("cannot open the batch output {shown}: {e}")),
    };
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("the batch output {shown} is not a regular file"));
    }
    let len = meta.len();
    let mut out = ReadBack::default();
    let mut good_end: u64 = 0;
    {
        let mut lines = Lines::new(std::io::BufReader::with_capacity(1 << 20, &mut f));
        let mut pos: u64 = 0;
        while let Some((line, text)) = lines.next_line().map_err(|e| format!("{shown}: {e}"))? {
            let end = pos + text.len() as u64 + 1;
            if end > len {
                break; // the last line has no newline: torn
            }
            pos = end;
            #[derive(serde::Deserialize)]
            struct Id {
                custom_id: String,
            }
            let id: Id = serde_json::from_slice(text).map_err(|e| {
                format!("{shown} line {line} is not a batch answer ({e}): is it another program's file?")
            })?;
            done.insert(id_hash(&id.custom_id));
            out.lines += 1;
            good_end = pos;
        }
    }
    if good_end < len {
        out.cut = len - good_end;
        f.set_len(good_end)
            .map_err(|e| format!("cannot cut the torn last line off {shown}: {e}"))?;
        f.seek(SeekFrom::End(0))
            .map_err(|e| format!("{shown}: {e}"))?;
        f.sync_all()
            .map_err(|e| format!("cannot sync {shown}: {e}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names() {
        let p = |o: &str, s: Shard| {
            let (a, b) = paths(Path::new(o), s);
            (a.display().to_string(), b.display().to_string())
        };
        assert_eq!(
            p("/d/out.jsonl", Shard::ALL),
            ("/d/out.jsonl".into(), "/d/out.errors.jsonl".into())
        );
        assert_eq!(
            p("/d/out", Shard::ALL),
            ("/d/out".into(), "/d/out.errors.jsonl".into())
        );
        assert_eq!(
            p("/d/out.jsonl", Shard { index: 1, count: 2 }),
            (
                "/d/out.shard-1-of-2.jsonl".into(),
                "/d/out.shard-1-of-2.errors.jsonl".into()
            )
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_rest_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let text = "{\"custom_id\":\"a\",\"response\":{}}\n{\"custom_id\":\"b\"}\n{\"custom_id\":\"c\",\"resp";
        std::fs::write(&out, text).unwrap();
        let mut done = HashSet::new();
        let r = read_back(&out, &mut done).unwrap();
        assert_eq!(r, ReadBack { lines: 2, cut: 22 });
        assert!(done.contains(&id_hash("a")) && done.contains(&id_hash("b")));
        assert!(!done.contains(&id_hash("c")));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"custom_id\":\"a\",\"response\":{}}\n{\"custom_id\":\"b\"}\n"
        );
        // read again: nothing more to cut
        assert_eq!(read_back(&out, &mut done).unwrap().cut, 0);
    }

    #[test]
    fn a_missing_file_is_empty_and_a_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut done = HashSet::new();
        assert_eq!(
            read_back(&dir.path().join("none"), &mut done).unwrap(),
            ReadBack::default()
        );
        let f = dir.path().join("notes.txt");
        std::fs::write(&f, "hello\nworld\n").unwrap();
        let e = read_back(&f, &mut done).unwrap_err();
        assert!(e.contains("line 1 is not a batch answer"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "hello\nworld\n",
            "left as it was"
        );
    }
}
