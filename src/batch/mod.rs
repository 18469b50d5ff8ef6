//! Batch generation (`ray-launch batch`, and a job's `--batch`): every request of an OpenAI
//! batch file sent through the job's endpoint, each `custom_id` written exactly once to OUT
//! or OUT.errors, resumable after any stop. [`input`] reads and validates the file as a
//! stream, [`resume`] reads the outputs back, [`retry`] and [`window`] are the pure policies,
//! [`send`] makes one request's attempts, and this module runs the loop that ties them.

pub mod cli;
pub mod input;
pub mod resume;
pub mod retry;
pub mod send;
pub mod window;

use crate::endpoint::BatchStatus;
use input::Shard;
use std::collections::VecDeque;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Everything a batch run needs (from `ray-launch batch`'s flags, or the job's plan).
#[derive(Debug, Clone)]
pub struct Options {
    pub input: PathBuf,
    pub output: PathBuf,
    /// The OpenAI base URL (`http://HOST:PORT/v1`): the job's router, or its only replica.
    pub base_url: String,
    pub api_key: Option<String>,
    /// Each replica's base URL, for their queue gauges (`auto` concurrency).
    pub replicas: Vec<String>,
    /// None: `auto`.
    pub concurrency: Option<usize>,
    pub retry: retry::Policy,
    pub request_timeout: Duration,
    /// After a stop: how long requests in flight may still finish.
    pub grace: Duration,
    pub shard: Shard,
    /// The model names the endpoint serves (empty: not checked).
    pub models: Vec<String>,
    pub progress_file: Option<PathBuf>,
    /// Answers are flushed at once and fsynced at least this often.
    pub sync_every: Duration,
    pub progress_every: Duration,
}

/// Why a run could not go on: bad input (or an output file that is not a batch's: exit 2,
/// nothing sent), or a failure to write (exit 1).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Io(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub status: BatchStatus,
    /// Every request of the input has its line in OUT or OUT.errors.
    pub complete: bool,
}

/// What one request came to, for the loop to write.
#[derive(Debug)]
pub struct Finished {
    pub custom_id: String,
    pub model: String,
    pub attempts: u32,
    pub result: send::Answer,
}

/// The two output files, held open for appending; OUT is flock'ed so that two batches never
/// write one file.
struct Outputs {
    out: std::fs::File,
    errors: std::fs::File,
    dirty: bool,
    last_sync: Instant,
}

impl Outputs {
    fn open(out: &std::path::Path, errors: &std::path::Path) -> Result<Outputs, String> {
        let open = |p: &std::path::Path| {
            crate::private::open_append(p)
                .map_err(|e| format!("cannot open the batch output {}: {e}", p.display()))
        };
        let o = open(out)?;
        // SAFETY: flock on an open descriptor we own
        if unsafe { libc::flock(o.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!(
                "another batch is writing {} (it holds its lock): two runs of one batch at once would answer some requests twice",
                out.display()
            ));
        }
        Ok(Outputs {
            out: o,
            errors: open(errors)?,
            dirty: false,
            last_sync: Instant::now(),
        })
    }

    /// One line, appended and flushed (one write: a crash leaves at most a torn last line).
    fn write(&mut self, to_errors: bool, line: &[u8]) -> Result<(), String> {
        let f = if to_errors {
            &mut self.errors
        } else {
            &mut self.out
        };
        f.write_all(line)
            .map_err(|e| format!("cannot write a batch answer: {e}"))?;
        self.dirty = true;
        Ok(())
    }

    fn sync(&mut self, every: Duration) -> Result<(), String> {
        if self.dirty && self.last_sync.elapsed() >= every {
            self.out
                .sync_data()
                .and_then(|()| self.errors.sync_data())
                .map_err(|e| format!("cannot sync the batch output: {e}"))?;
            self.dirty = false;
            self.last_sync = Instant::now();
        }
        Ok(())
    }
}

/// Counters and the rate over the last 10 s.
struct Tally {
    s: BatchStatus,
    t0: Instant,
    samples: VecDeque<(Instant, u64, u64)>,
}

impl Tally {
    fn tick(&mut self, in_flight: usize, window: usize) -> &BatchStatus {
        let now = Instant::now();
        let finished = self.s.done + self.s.failed;
        self.samples.push_back((now, finished, self.s.tokens_out));
        while self.samples.len() > 2
            && now.duration_since(self.samples[0].0) > Duration::from_secs(10)
        {
            self.samples.pop_front();
        }
        let (t, n, tok) = self.samples[0];
        let dt = now.duration_since(t).as_secs_f64();
        if dt > 0.5 {
            self.s.rate = (finished - n) as f64 / dt;
            self.s.tokens_rate = (self.s.tokens_out - tok) as f64 / dt;
        }
        let left = self.s.total.saturating_sub(finished);
        self.s.eta_s = (self.s.rate > 0.0).then(|| left as f64 / self.s.rate);
        self.s.in_flight = in_flight as u64;
        self.s.window = window as u64;
        self.s.elapsed_s = (self.t0.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        &self.s
    }
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Run the batch until every request has its line, or `stop` turns true (then the requests
/// in flight get `grace` to finish; what did not is sent again by the next run).
pub async fn run(o: Options, mut stop: watch::Receiver<bool>) -> Result<Report, Failure> {
    let (out_path, err_path) = resume::paths(&o.output, o.shard);
    let mut outputs = Outputs::open(&out_path, &err_path).map_err(Failure::Io)?;
    let mut known = input::Known::default();
    for (p, set) in [
        (&out_path, &mut known.answered),
        (&err_path, &mut known.failed),
    ] {
        let r = resume::read_back(p, set).map_err(Failure::BadInput)?;
        if r.cut > 0 {
            tracing::warn!(
                "{}: cut a torn last line ({} bytes) written by a run that was killed",
                p.display(),
                r.cut
            );
        }
    }
    let (input, models, shard) = (o.input.clone(), o.models.clone(), o.shard);
    let (summary, known) = tokio::task::spawn_blocking(move || {
        input::validate(&input, &models, shard, &known).map(|s| (s, known))
    })
    .await
    .map_err(|e| Failure::Io(format!("the input check failed: {e}")))?
    .map_err(Failure::BadInput)?;
    let mut tally = Tally {
        s: BatchStatus {
            state: "running".into(),
            total: summary.requests,
            done: summary.answered,
            failed: summary.failed,
            resumed: summary.answered + summary.failed,
            output: out_path.display().to_string(),
            errors: err_path.display().to_string(),
            ..Default::default()
        },
        t0: Instant::now(),
        samples: VecDeque::new(),
    };
    if tally.s.resumed > 0 {
        tracing::info!(
            "resuming: {} of {} requests already answered or failed (in {} and {})",
            tally.s.resumed,
            summary.requests,
            out_path.display(),
            err_path.display()
        );
    }
    let req_rx = stream_input(&o, known);
    drive(&o, req_rx, &mut outputs, &mut tally, &mut stop)
        .await
        .map_err(Failure::Io)?;
    outputs.sync(Duration::ZERO).map_err(Failure::Io)?;
    // the truth is what the files hold: every request of the input has its line
    let complete = tally.s.done + tally.s.failed >= tally.s.total;
    tally.s.state = if complete { "done" } else { "stopped" }.into();
    let status = tally.tick(0, 0).clone();
    write_progress(&o, &status);
    Ok(Report { status, complete })
}

/// The input streamed by a blocking reader: the shard's lines whose id is not written yet,
/// through a small bounded channel (memory: the window, not the file).
fn stream_input(o: &Options, known: input::Known) -> mpsc::Receiver<input::Request> {
    let (tx, rx) = mpsc::channel(256);
    let (path, shard) = (o.input.clone(), o.shard);
    std::thread::spawn(move || {
        let Ok(f) = input::open(&path) else { return };
        let mut lines = input::Lines::new(std::io::BufReader::with_capacity(1 << 20, f));
        while let Ok(Some((line, text))) = lines.next_line() {
            if input::blank(text) || !shard.takes(line) {
                continue;
            }
            let Ok(r) = input::parse_line(line, text) else {
                continue;
            };
            if known.contains(&input::id_hash(&r.custom_id)) {
                continue;
            }
            if tx.blocking_send(r).is_err() {
                return;
            }
        }
    });
    rx
}

fn write_progress(o: &Options, s: &BatchStatus) {
    if let Some(p) = &o.progress_file {
        if let Ok(data) = serde_json::to_vec(s) {
            let _ = crate::private::write_atomic(p, &data);
        }
    }
}

/// The loop: keep the window full, write each answer as it comes, report progress, and on a
/// stop let what is in flight finish within the grace.
async fn drive(
    o: &Options,
    mut req_rx: mpsc::Receiver<input::Request>,
    outputs: &mut Outputs,
    tally: &mut Tally,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let client = send::client(o)?;
    let mut window = match o.concurrency {
        Some(n) => window::Window::fixed(n),
        None => window::Window::auto(o.replicas.len()),
    };
    let gauges =
        (!window.is_fixed()).then(|| send::watch_queues(&client, &o.replicas, o.api_key.clone()));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Finished>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut in_flight = 0usize;
    let mut input_done = false;
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut last_progress = Instant::now();
    let job = std::env::var(crate::env_vars::SLURM_JOB_ID).unwrap_or_default();
    let mut seq: u64 = 0;
    loop {
        if (input_done || stopping.is_some()) && in_flight == 0 {
            break;
        }
        let can_send = stopping.is_none() && !input_done && in_flight < window.limit();
        tokio::select! {
            biased;
            _ = stop.changed(), if stopping.is_none() => {
                if *stop.borrow() {
                    tracing::info!("batch: stopping; {in_flight} request(s) in flight get {} to finish", humantime::format_duration(o.grace));
                    stopping = Some(tokio::time::Instant::now() + o.grace);
                }
            }
            Some(f) = done_rx.recv() => {
                in_flight -= 1;
                seq += 1;
                if stopping.is_some() && f.result.retriable() {
                    // the job is going down under it (replicas stopping): not the request's
                    // fault, and not final; the next run sends it again
                    continue;
                }
                record(f, &job, seq, outputs, tally)?;
            }
            r = req_rx.recv(), if can_send => match r {
                Some(req) => {
                    in_flight += 1;
                    tasks.spawn(send::request(client.clone(), o.clone(), req, done_tx.clone()));
                }
                None => input_done = true,
            },
            _ = ticker.tick() => {
                if let Some(g) = &gauges {
                    let waiting = *g.borrow();
                    window.on_sample(waiting, in_flight);
                }
                outputs.sync(o.sync_every)?;
                if last_progress.elapsed() >= o.progress_every {
                    last_progress = Instant::now();
                    let s = tally.tick(in_flight, window.limit()).clone();
                    write_progress(o, &s);
                    tracing::info!("{}", s.line());
                }
                if stopping.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    tracing::warn!("batch: {in_flight} request(s) still in flight after the grace: left for the next run");
                    break;
                }
            }
        }
        while let Some(r) = tasks.try_join_next() {
            if let Err(e) = r {
                if e.is_panic() {
                    return Err(format!("a request task failed: {e}"));
                }
            }
        }
    }
    tasks.abort_all();
    Ok(())
}

/// One answer's line, written to OUT (2xx) or OUT.errors, and counted.
fn record(
    f: Finished,
    job: &str,
    seq: u64,
    outputs: &mut Outputs,
    tally: &mut Tally,
) -> Result<(), String> {
    tally.s.retried += u64::from(f.attempts.saturating_sub(1));
    let (line, ok) = send::answer_line(&f, job, seq);
    outputs.write(!ok, &line)?;
    if ok {
        tally.s.done += 1;
        if let Some((i, o)) = f.result.usage() {
            tally.s.tokens_in += i;
            tally.s.tokens_out += o;
        }
        *tally.s.per_model.entry(f.model).or_default() += 1;
    } else {
        tally.s.failed += 1;
    }
    Ok(())
}
