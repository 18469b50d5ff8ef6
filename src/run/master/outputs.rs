//! What the master leaves for the user: the event log, the endpoint file, the API key file,
//! and the requeue of a job whose node failed.

use crate::endpoint::{EndpointFile, ReplicaStatus, Status};
use crate::input::settings::Settings;
use crate::input::slurm::Step;
use crate::plan::Plan;
use crate::run::events::Event;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub(super) struct Outputs {
    pub(super) settings: Settings,
    pub(super) step: Step,
    pub(super) event_log: Option<std::fs::File>,
    pub(super) t0: Instant,
    pub(super) ready_at: Option<String>,
    /// The API key file named by the endpoint file, and whether the launcher wrote it.
    pub(super) api_key_path: Option<String>,
    pub(super) wrote_api_key: bool,
    pub(super) refused: u64,
    /// What the endpoint file says now (rewritten when the replicas change).
    pub(super) status: (Status, Option<String>, Option<i32>),
    pub(super) replicas: Vec<ReplicaStatus>,
    pub(super) dropped: Vec<String>,
    /// A batch job's progress, as its batch last wrote it.
    pub(super) batch: Option<crate::endpoint::BatchStatus>,
    /// When the progress was last logged / recorded as an event; whether `batch_done` was.
    batch_logged: Option<Instant>,
    batch_evented: Option<Instant>,
    batch_done: bool,
}

impl Outputs {
    /// One line of the event log.
    pub(super) fn event(&mut self, event: &Event, node: Option<&str>) {
        let Some(f) = self.event_log.as_mut() else {
            return;
        };
        let t = (self.t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        let line = event.line(&now_rfc3339(), t, node);
        use std::io::Write as _;
        let _ = writeln!(f, "{line}");
    }

    /// A connection that failed the handshake: logged and recorded (the first ones one by
    /// one, then one line per hundred, so that a flood cannot fill the disk).
    pub(super) fn refused(&mut self, peer: std::net::SocketAddr, reason: &str) {
        self.refused += 1;
        let n = self.refused;
        if n <= 20 || n.is_multiple_of(100) {
            let more = if n > 20 {
                format!(" ({n} refused so far)")
            } else {
                String::new()
            };
            tracing::warn!("dropped a connection from {peer}: {reason}{more}");
            self.event(
                &Event::PeerRefused {
                    peer: peer.to_string(),
                    reason: reason.to_string(),
                    count: n,
                },
                None,
            );
        }
    }

    pub(super) fn endpoint(
        &mut self,
        plan: Option<&Plan>,
        status: Status,
        reason: Option<&str>,
        code: Option<i32>,
    ) {
        if status == Status::Ready && self.status.0 != Status::Ready {
            self.ready_at = Some(now_rfc3339());
        }
        self.status = (status, reason.map(str::to_string), code);
        let urls: Vec<String> = plan
            .map(|p| p.endpoints.iter().map(|e| e.url.clone()).collect())
            .unwrap_or_default();
        let first = &self.settings.models[0];
        let f = EndpointFile {
            status,
            url: plan.map(|p| p.url().to_string()),
            urls,
            replicas: self.replicas.clone(),
            models: plan
                .map(|p| crate::endpoint::model_statuses(p, &self.replicas, &self.dropped))
                .unwrap_or_default(),
            model: first.model.clone(),
            served_model_name: first.served().to_string(),
            job_id: self.step.job_id.clone(),
            node: self.step.master().to_string(),
            updated_at: now_rfc3339(),
            ready_at: self.ready_at.clone(),
            api_key_path: self.api_key_path.clone(),
            reason: reason.map(str::to_string),
            exit_code: code,
            batch: self.batch.clone(),
        };
        let path = std::path::Path::new(&self.settings.endpoint_file);
        if let Err(e) = f.write(path) {
            tracing::warn!(
                "cannot write endpoint file {}: {e}",
                self.settings.endpoint_file
            );
        }
    }
}

/// `scontrol requeue JOB` once every node has torn down: Slurm ends what is left of the job
/// and queues it again (a batch job, requeue allowed on the cluster); what it says is logged.
pub(super) async fn requeue_job(step: &Step, why: &str) {
    if step.kind != crate::input::slurm::StepKind::Srun {
        tracing::warn!("a requeue {why}, but this is no Slurm job: nothing to requeue");
        return;
    }
    tracing::warn!("requeueing job {} {why}", step.job_id);
    let run = tokio::process::Command::new("scontrol")
        .args(["requeue", &step.job_id])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(o)) if o.status.success() => {
            tracing::info!("job {} is back in the queue (scontrol requeue)", step.job_id)
        }
        Ok(Ok(o)) => tracing::warn!(
            "scontrol requeue {} failed ({}): {}; submit with `sbatch --requeue` on a cluster that allows it",
            step.job_id,
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(Err(e)) => tracing::warn!("cannot run scontrol requeue {}: {e}", step.job_id),
        Err(_) => tracing::warn!("scontrol requeue {} did not answer within 10s", step.job_id),
    }
}

/// The API key file the launcher writes next to the endpoint file (`endpoint.json` →
/// `endpoint.api-key`).
pub fn api_key_file(endpoint_file: &str) -> PathBuf {
    PathBuf::from(endpoint_file).with_extension("api-key")
}

impl Outputs {
    /// Open the event log (appended, 0600) and settle the endpoint's API key file: the user's
    /// own (`server.api_key_file`), or `key` written next to the endpoint file (0600).
    pub(super) fn open(settings: &Settings, step: &Step, key: Option<String>) -> Outputs {
        let event_log = settings.event_log.as_ref().and_then(|p| {
            let p = PathBuf::from(p);
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            crate::private::open_append(&p)
                .map_err(|e| tracing::warn!("cannot open event log {}: {e}", p.display()))
                .ok()
        });
        let mut out = Outputs {
            settings: settings.clone(),
            step: step.clone(),
            event_log,
            t0: Instant::now(),
            ready_at: None,
            api_key_path: None,
            wrote_api_key: false,
            refused: 0,
            status: (Status::Starting, None, None),
            replicas: Vec::new(),
            dropped: Vec::new(),
            batch: None,
            batch_logged: None,
            batch_evented: None,
            batch_done: false,
        };
        if !settings.auth {
            return out;
        }
        if let Some(f) = &settings.policy.api_key_file {
            out.api_key_path = Some(f.clone());
            return out;
        }
        let path = api_key_file(&settings.endpoint_file);
        if let Some(key) = key {
            match crate::private::write_atomic(&path, key.as_bytes()) {
                Ok(()) => {
                    out.api_key_path = Some(path.display().to_string());
                    out.wrote_api_key = true;
                }
                Err(e) => tracing::warn!("cannot write the API key file {}: {e}", path.display()),
            }
        }
        out
    }

    /// Read the batch's progress file: into the endpoint file when it changed, a line in the
    /// log every 5 s, a `batch_progress` event every 10 s, `batch_done` once it ended.
    /// `last`: the batch has exited (the job is over): whatever it said last is final.
    pub(super) fn batch_poll(&mut self, plan: Option<&Plan>, last: bool) {
        let Some(b) = &self.settings.batch else {
            return;
        };
        let Ok(data) = std::fs::read(&b.progress_file) else {
            return;
        };
        let Ok(mut st) = serde_json::from_slice::<crate::endpoint::BatchStatus>(&data) else {
            return;
        };
        if last && st.state == "running" {
            // it was stopped before it could say so
            st.state = "stopped".into();
        }
        let due = |t: Option<Instant>, every: u64| {
            t.is_none_or(|t| t.elapsed() >= Duration::from_secs(every))
        };
        if self.batch.as_ref() != Some(&st) {
            self.batch = Some(st.clone());
            let (status, reason, code) = self.status.clone();
            self.endpoint(plan, status, reason.as_deref(), code);
        }
        let ended = st.state != "running";
        if due(self.batch_logged, 5) || (ended && !self.batch_done) {
            self.batch_logged = Some(Instant::now());
            tracing::info!("{}", st.line());
        }
        if due(self.batch_evented, 10) && !ended {
            self.batch_evented = Some(Instant::now());
            self.event(
                &Event::BatchProgress {
                    total: st.total,
                    done: st.done,
                    failed: st.failed,
                    retried: st.retried,
                    rate: st.rate,
                    tokens_rate: st.tokens_rate,
                    eta_s: st.eta_s,
                },
                None,
            );
        }
        if (ended || last) && !self.batch_done {
            self.batch_done = true;
            let per: Vec<String> = st
                .per_model
                .iter()
                .map(|(m, n)| format!("{m} {n}"))
                .collect();
            let run = st.done + st.failed - st.resumed;
            tracing::info!(
                "batch {}: {} answered, {} failed for good, {} resumed from earlier runs; {run} this run in {:.1} s ({:.1} req/s), tokens in {} out {}; per model: {}; answers in {}, failures in {}",
                st.state,
                st.done,
                st.failed,
                st.resumed,
                st.elapsed_s,
                if st.elapsed_s > 0.0 { run as f64 / st.elapsed_s } else { 0.0 },
                st.tokens_in,
                st.tokens_out,
                if per.is_empty() { "-".to_string() } else { per.join(", ") },
                st.output,
                st.errors
            );
            self.event(
                &Event::BatchDone {
                    state: st.state.clone(),
                    total: st.total,
                    done: st.done,
                    failed: st.failed,
                    resumed: st.resumed,
                    tokens_in: st.tokens_in,
                    tokens_out: st.tokens_out,
                    elapsed_s: st.elapsed_s,
                },
                None,
            );
        }
    }

    /// The job is over: the key file the launcher wrote goes.
    pub(super) fn close(&self) {
        if let Some(b) = &self.settings.batch {
            // the progress file is the job's own (its last state is in the endpoint file)
            let _ = std::fs::remove_file(&b.progress_file);
        }
        if self.wrote_api_key {
            if let Some(p) = &self.api_key_path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
