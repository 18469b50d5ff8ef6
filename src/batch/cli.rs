//! `ray-launch batch`: the flags → [`Options`](super::Options); where the endpoint is (its
//! URL and key from the flags and environment, or from a job's endpoint file); signals →
//! the stop; the report and the exit code.

use super::input::Shard;
use super::{retry, Options};
use crate::cli::BatchArgs;
use crate::env_vars as ev;
use crate::error::{Error, Result};
use crate::exit;
use std::time::Duration;

/// `none`, `auto` (this job array task's share), or `INDEX/COUNT`.
pub fn shard(
    spec: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<Shard, String> {
    match spec {
        "none" | "" => Ok(Shard::ALL),
        "auto" => {
            let num = |k: &str| env(k).and_then(|v| v.trim().parse::<u32>().ok());
            let (Some(id), Some(count)) =
                (num("SLURM_ARRAY_TASK_ID"), num("SLURM_ARRAY_TASK_COUNT"))
            else {
                return Ok(Shard::ALL); // no job array: the whole input
            };
            let min = num("SLURM_ARRAY_TASK_MIN").unwrap_or(0);
            let step = num("SLURM_ARRAY_TASK_STEP").unwrap_or(1).max(1);
            let index = id.checked_sub(min).map(|d| d / step).filter(|i| *i < count).ok_or_else(|| {
                format!("array task {id} (min {min}, step {step}, count {count}) has no shard of its own: the array is not a regular range")
            })?;
            Ok(Shard { index, count })
        }
        s => Shard::parse(s),
    }
}

/// Where to send: the flags' URL (key from OPENAI_API_KEY), or a job's endpoint file once
/// it says ready (its URL, key file and replicas).
fn endpoint(a: &BatchArgs) -> Result<(String, Option<String>, Vec<String>)> {
    if let Some(url) = &a.url {
        let key = std::env::var(ev::OPENAI_API_KEY)
            .ok()
            .filter(|k| !k.is_empty());
        return Ok((url.clone(), key, a.replicas.clone()));
    }
    let Some(path) = &a.endpoint_file else {
        return Err(Error::usage("batch: no endpoint: give --url (or OPENAI_BASE_URL) or --endpoint-file (or RAY_LAUNCH_ENDPOINT)")
            .hint("e.g. ray-launch batch --endpoint-file ray-launch-1234/endpoint.json --input in.jsonl --output out.jsonl"));
    };
    let f = crate::cli::wait_ready(path, Duration::from_secs(1800))?;
    let key = match &f.api_key_path {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Error::usage(format!("cannot read the job's API key file {p}: {e}")))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    Ok((f.url.unwrap_or_default(), key, f.urls))
}

pub fn main(a: BatchArgs) -> Result<i32> {
    crate::logging::init(0, "batch");
    let shard = shard(&a.shard, &|k| std::env::var(k).ok()).map_err(|e| {
        Error::usage(format!("batch --shard: {e}")).hint("give --shard INDEX/COUNT")
    })?;
    let concurrency = match a.concurrency.as_str() {
        "auto" => None,
        n => Some(n.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            Error::usage(format!(
                "batch --concurrency `{n}` is neither `auto` nor a number >= 1"
            ))
        })?),
    };
    let (base_url, api_key, replicas) = endpoint(&a)?;
    let o = Options {
        input: a.input.clone(),
        output: a.output.clone(),
        base_url,
        api_key,
        replicas,
        concurrency,
        retry: retry::Policy {
            max_attempts: a.max_attempts,
            ..retry::Policy::default()
        },
        request_timeout: a.request_timeout,
        grace: a.grace,
        shard,
        models: a.models.clone(),
        progress_file: a.progress_file.clone(),
        sync_every: Duration::from_secs(1),
        progress_every: Duration::from_secs(2),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::internal("cannot start the runtime").cause(e))?;
    rt.block_on(async move {
        let mut sigs = crate::run::signals::listen().map_err(|e| Error::internal("cannot install signal handlers").cause(e))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            // Slurm sends SIGTERM twice at a time limit, and scancel's SIGTERM meets the
            // launcher's own: a repeat within 2 s is the same request, a later one insists
            let mut first: Option<std::time::Instant> = None;
            while let Some(sig) = sigs.recv().await {
                if first.is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
                    continue;
                }
                if first.is_none() {
                    first = Some(std::time::Instant::now());
                    tracing::info!("batch: {} received: no new requests; finishing those in flight", crate::run::signals::name(sig));
                    let _ = stop_tx.send(true);
                } else {
                    tracing::warn!("batch: {} again: exiting now (the answers written so far are kept)", crate::run::signals::name(sig));
                    std::process::exit(exit::BATCH_INCOMPLETE);
                }
            }
        });
        let report = super::run(o, stop_rx).await.map_err(|e| match e {
            super::Failure::BadInput(e) => Error::usage(e).hint("fix the batch file; `ray-launch check --batch FILE` checks it"),
            super::Failure::Io(e) => Error::internal(e),
        })?;
        let s = &report.status;
        tracing::info!("{}", s.line());
        tracing::info!(
            "batch summary: {} answered, {} failed ({} resumed from earlier runs), tokens in {} out {}, {:.1} s, {:.1} req/s; answers in {}, failures in {}",
            s.done, s.failed, s.resumed, s.tokens_in, s.tokens_out, s.elapsed_s,
            if s.elapsed_s > 0.0 { (s.done + s.failed - s.resumed) as f64 / s.elapsed_s } else { 0.0 },
            s.output, s.errors
        );
        Ok(if report.complete { exit::SUCCESS } else { exit::BATCH_INCOMPLETE })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_from_a_job_array() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert_eq!(shard("none", &env(&[])).unwrap(), Shard::ALL);
        assert_eq!(
            shard("auto", &env(&[])).unwrap(),
            Shard::ALL,
            "no array: everything"
        );
        let a = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert_eq!(shard("auto", &a).unwrap(), Shard { index: 2, count: 3 });
        let b = env(&[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
        ]);
        assert_eq!(shard("auto", &b).unwrap(), Shard { index: 1, count: 2 });
        let odd = env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]);
        assert!(shard("auto", &odd)
            .unwrap_err()
            .contains("not a regular range"));
        assert_eq!(
            shard("1/4", &env(&[])).unwrap(),
            Shard { index: 1, count: 4 }
        );
    }
}
