//! The master's side of a service (`service:`): this job's entry in the service file, its
//! successor submitted once before the time limit (the same batch script, through `sbatch`),
//! and the handover — [`crate::service::handover`] decides, this task looks (the service file,
//! Slurm, the job's router) and acts. It runs beside the master's loop and tells it only one
//! thing: end the job with exit 0 ([`super::gate::Inbound::Handover`]).

use super::gate::Inbound;
use crate::endpoint::Status;
use crate::input::settings::ServiceJob;
use crate::service::handover::{self, Act, Handover, Seen, Successor};
use crate::service::{now, JobState, Service};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What the master's loop tells the service task of the job.
#[derive(Debug, Clone, Default)]
pub struct JobView {
    pub status: Status,
    pub reason: Option<String>,
    /// The job's URL (its router's), once planned.
    pub url: Option<String>,
    /// SIGUSR1 asked for the handover now.
    pub usr1: bool,
}

/// Start the task; the sender the master's loop keeps the job's view in.
pub(super) fn start(
    svc: &ServiceJob,
    job: String,
    endpoint_file: String,
    grace: Duration,
    in_tx: mpsc::UnboundedSender<Inbound>,
) -> watch::Sender<JobView> {
    let (tx, rx) = watch::channel(JobView::default());
    let svc = svc.clone();
    tokio::spawn(async move {
        let service = match Service::open(&svc.name, Some(&svc.dir)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("service `{}`: {e}; no handover", svc.name);
                return;
            }
        };
        let task = Task {
            service,
            job,
            handover: Handover::new(svc.handover_before, grace),
            end: None,
        };
        task.run(rx, endpoint_file, in_tx).await;
    });
    tx
}

/// The job's last word in the service file, written before the master returns (the task may
/// not get another tick).
pub(super) fn finish(svc: &ServiceJob, job: &str, status: Status, reason: Option<&str>) {
    let Ok(service) = Service::open(&svc.name, Some(&svc.dir)) else {
        return;
    };
    let res = service.update(|sf| {
        let j = sf.job_mut(job);
        j.state = if status == Status::Failed {
            JobState::Failed
        } else {
            JobState::Ended
        };
        if let Some(r) = reason {
            j.reason = Some(r.to_string());
        }
        j.updated = now();
    });
    if let Err(e) = res {
        tracing::warn!("service `{}`: {e}", svc.name);
    }
}

struct Task {
    service: Service,
    job: String,
    handover: Handover,
    end: Option<u64>,
}

impl Task {
    async fn run(
        mut self,
        rx: watch::Receiver<JobView>,
        endpoint_file: String,
        in_tx: mpsc::UnboundedSender<Inbound>,
    ) {
        self.end = time_left(&self.job).await.map(|d| now() + d.as_secs());
        let (end, at) = (self.end, self.handover.due(self.end));
        self.update(|j| {
            j.state = JobState::Starting;
            j.end = end;
            j.handover_at = at;
            j.endpoint_file = Some(endpoint_file.clone());
        });
        match at {
            Some(at) => tracing::info!(
                "service `{}`: the successor is submitted in {}s (service.handover_before before the time limit)",
                self.service.name,
                at.saturating_sub(now())
            ),
            None => tracing::info!(
                "service `{}`: this job has no time limit; no successor is submitted",
                self.service.name
            ),
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut serving = false;
        loop {
            tick.tick().await;
            let view = rx.borrow().clone();
            if view.status.is_final() {
                let state = if view.status == Status::Failed {
                    JobState::Failed
                } else {
                    JobState::Ended
                };
                self.update(|j| {
                    j.state = state;
                    if view.reason.is_some() {
                        j.reason = view.reason.clone();
                    }
                });
                return;
            }
            if view.status == Status::Ready && !serving {
                serving = true;
                self.update(|j| {
                    if j.state == JobState::Starting {
                        j.state = JobState::Serving;
                    }
                    j.url = view.url.clone();
                });
            }
            let seen = self.look(serving, view.url.as_deref(), view.usr1).await;
            let mut acts = self.handover.step(&seen);
            while let Some(act) = acts.pop() {
                match act {
                    Act::Submit => {
                        let res = self.submit().await;
                        acts.extend(self.handover.submitted(res));
                    }
                    Act::Drain(why) => {
                        tracing::info!("service `{}`: draining: {why}", self.service.name);
                        self.update(|j| {
                            j.state = JobState::Draining;
                            j.reason = Some(why.clone());
                        });
                    }
                    Act::Note(why) => {
                        tracing::warn!("service `{}`: {why}", self.service.name);
                        self.update(|j| j.reason = Some(why.clone()));
                    }
                    Act::Exit(why) => {
                        let _ = in_tx.send(Inbound::Handover(why));
                    }
                }
            }
        }
    }

    /// Change this job's entry in the service file (a failure is logged: the job serves on).
    fn update(&self, f: impl FnOnce(&mut crate::service::Job)) {
        let job = self.job.clone();
        if let Err(e) = self.service.update(|sf| {
            let j = sf.job_mut(&job);
            f(j);
            j.updated = now();
        }) {
            tracing::warn!("service `{}`: {e}", self.service.name);
        }
    }

    /// One look at the service file, the successor and the job's router.
    async fn look(&self, ready: bool, url: Option<&str>, usr1: bool) -> Seen {
        let sf = self.service.read().unwrap_or_default();
        let me = sf.job(&self.job);
        let successor = match me.and_then(|j| j.successor.clone()) {
            Some(id) => Some(match sf.job(&id).map(|j| j.state) {
                Some(JobState::Serving) => Successor::Serving,
                Some(JobState::Failed) => Successor::Failed(
                    sf.job(&id)
                        .and_then(|j| j.reason.clone())
                        .unwrap_or_else(|| "it failed".into()),
                ),
                _ => match slurm_end(&id).await {
                    Some(why) => Successor::Failed(why),
                    None => Successor::Pending,
                },
            }),
            None => None,
        };
        let draining = matches!(self.handover.state, handover::State::Draining { .. });
        let outstanding = match (draining, url) {
            (true, Some(u)) => in_flight(u).await,
            _ => 0,
        };
        Seen {
            now: now(),
            end: self.end,
            ready,
            usr1,
            stop: sf.stopped,
            successor,
            outstanding,
        }
    }

    /// Submit the successor once: under the service file's lock, a successor this job already
    /// has (or a job of the chain queued or starting) is taken instead of a second one.
    async fn submit(&self) -> Result<String, String> {
        let job = self.job.clone();
        let taken = self
            .service
            .update(|sf| {
                let other = sf
                    .jobs
                    .iter()
                    .find(|j| {
                        j.job != job && matches!(j.state, JobState::Queued | JobState::Starting)
                    })
                    .map(|j| j.job.clone());
                let me = sf.job_mut(&job);
                match me.successor.clone().or(other) {
                    Some(s) => Some(s),
                    None => {
                        me.successor = Some(String::new());
                        None
                    }
                }
            })
            .map_err(|e| format!("the service file: {e}"))?;
        if let Some(s) = taken.filter(|s| !s.is_empty()) {
            tracing::info!("service `{}`: job {s} already follows", self.service.name);
            let _ = self
                .service
                .update(|sf| sf.job_mut(&job).successor = Some(s.clone()));
            return Ok(s);
        }
        let res = sbatch_again(&self.job, &self.service).await;
        let _ = self.service.update(|sf| match &res {
            Ok(id) => {
                sf.job_mut(&job).successor = Some(id.clone());
                let s = sf.job_mut(id);
                s.state = JobState::Queued;
                s.updated = now();
            }
            Err(_) => sf.job_mut(&job).successor = None,
        });
        if let Ok(id) = &res {
            tracing::info!(
                "service `{}`: submitted the successor, job {id}",
                self.service.name
            );
        }
        res
    }
}

/// Run a Slurm command (10 s at most); its stdout, or why not.
async fn slurm(program: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // the job's own Slurm variables would steer a new submission (SBATCH_*, SLURM_*)
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("SLURM_") || k.starts_with("SBATCH_") || k.starts_with("SALLOC_"))
            && k != "SLURM_CONF"
        {
            cmd.env_remove(&*k);
        }
    }
    match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
        Ok(Ok(o)) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(Ok(o)) => Err(format!(
            "{program} {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("cannot run {program}: {e}")),
        Err(_) => Err(format!("{program} did not answer within 10s")),
    }
}

/// How long Slurm gives this job still (`squeue -o %L`); none without a limit.
async fn time_left(job: &str) -> Option<Duration> {
    let out = slurm("squeue", &["-h", "-j", job, "-o", "%L"]).await.ok()?;
    handover::parse_time_left(out.lines().next()?)
}

/// `scontrol show job JOB -o` as its fields.
async fn job_fields(job: &str) -> Result<Vec<(String, String)>, String> {
    let out = slurm("scontrol", &["show", "job", job, "-o"]).await?;
    Ok(out
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Why a successor that never served is over, from Slurm (`None`: queued or running).
async fn slurm_end(job: &str) -> Option<String> {
    let fields = match job_fields(job).await {
        Ok(f) => f,
        Err(e) if e.contains("Invalid job id") => {
            return Some(format!("job {job} is gone from Slurm before it served"))
        }
        Err(_) => return None,
    };
    let get = |k: &str| fields.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
    let state = get("JobState").unwrap_or("UNKNOWN");
    if matches!(
        state,
        "PENDING" | "RUNNING" | "CONFIGURING" | "REQUEUED" | "SUSPENDED" | "COMPLETING"
    ) {
        return None;
    }
    Some(format!(
        "its job ended {state} (exit {}) before it served; log: {}",
        get("ExitCode").unwrap_or("?"),
        get("StdOut").unwrap_or("?")
    ))
}

/// The same batch script again, with the options Slurm kept of this job that a script's own
/// `#SBATCH` lines may not hold: name, partition, account, QOS, time limit, node count and
/// working directory. The script is `scontrol write batch_script`'s copy, kept in the service
/// directory (0600).
async fn sbatch_again(job: &str, service: &Service) -> Result<String, String> {
    let fields = job_fields(job).await?;
    let get = |k: &str| {
        fields
            .iter()
            .find(|(x, _)| x == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty() && v != "(null)")
    };
    let script = service.dir.join(format!("job-{job}.sbatch"));
    let text = slurm("scontrol", &["write", "batch_script", job, "-"]).await?;
    crate::private::write_atomic(&script, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let mut args: Vec<String> = vec!["--parsable".into()];
    for (field, flag) in [
        ("JobName", "--job-name"),
        ("Partition", "--partition"),
        ("Account", "--account"),
        ("QOS", "--qos"),
        ("TimeLimit", "--time"),
        ("WorkDir", "--chdir"),
    ] {
        if let Some(v) = get(field) {
            args.push(format!("{flag}={v}"));
        }
    }
    if let Some(n) = get("NumNodes") {
        let n = n.split('-').next().unwrap_or(&n).to_string();
        args.push(format!("--nodes={n}"));
    }
    args.push(script.to_string_lossy().into_owned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = slurm("sbatch", &argv).await?;
    let id = out.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("sbatch answered `{}`, not a job id", out.trim()));
    }
    Ok(id)
}

/// Requests in flight through the job's router (its `/metrics`); 0 when it does not answer.
async fn in_flight(url: &str) -> usize {
    let metrics = url.trim_end_matches("/v1").to_string() + "/metrics";
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return 0;
    };
    let Ok(text) = async { client.get(&metrics).send().await?.text().await }.await else {
        return 0;
    };
    crate::run::progress::sum_of(&text, "ray_launch_router_outstanding").unwrap_or(0.0) as usize
}
