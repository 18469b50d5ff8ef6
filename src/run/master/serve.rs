//! The master's loop: heartbeats out, what the ranks say in, the clock; [`Coord`]'s actions
//! carried out (frames to ranks, the event log, the endpoint file, the attach check).

use super::gate::{self, Ctx, Inbound};
use super::outputs::{self, Outputs};
use super::{Action, Coord};
use crate::auth::{self, Auth};
use crate::endpoint::Status;
use crate::input::settings::Settings;
use crate::input::slurm::Step;
use crate::run::channel::{self, Line, ToMaster, ToRank};
use crate::run::error::{Kind, RunError};
use crate::run::events::Event;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Run the coordinator until every rank has stopped (or the teardown budget after the stop,
/// when some never report). Sends on `finished` when it is over.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    step: Step,
    auth: Auth,
    finished: oneshot::Sender<()>,
) {
    let channel_port = listener.local_addr().map_or(0, |a| a.port());
    let ctx = Arc::new(Ctx {
        auth,
        job: step.job_id.clone(),
        step: step.step_id.clone(),
        job_nonce: auth::random_hex(),
        user_timeout: settings.health.heartbeat_timeout,
        port: channel_port,
    });
    // the endpoint's API key: the user's own file, or one the launcher writes (0600)
    let key = ctx
        .auth
        .master_job_key(&ctx.job, &ctx.step, &ctx.job_nonce)
        .map(|k| k.api_key());
    let mut out = Outputs::open(&settings, &step, key);
    out.event(
        &Event::LauncherStarted {
            nodes: step.nodes.len(),
            job_id: step.job_id.clone(),
            step_id: step.step_id.clone(),
            auth: ctx.auth.method.name().to_string(),
        },
        Some(step.master()),
    );
    out.endpoint(None, Status::Starting, None, None);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Inbound>();
    let service = settings.service.as_ref().map(|svc| {
        super::service::start(
            svc,
            step.job_id.clone(),
            settings.endpoint_file.clone(),
            settings.timeouts.shutdown_grace,
            in_tx.clone(),
        )
    });
    let acceptor = tokio::spawn(gate::accept_loop(listener, ctx, in_tx.clone()));
    let mut m = Master {
        coord: Coord::new(settings.clone(), step, channel_port, out.t0),
        settings,
        out,
        writers: BTreeMap::new(),
        cached: None,
        in_tx,
        acceptor: Some(acceptor),
        requeue: None,
        service,
    };
    m.run(&mut in_rx).await;
    m.finish(&mut in_rx).await;
    let _ = finished.send(());
}

/// The loop's state: the pure core, and what carries out its actions.
struct Master {
    coord: Coord,
    settings: Settings,
    out: Outputs,
    writers: BTreeMap<usize, channel::Sender>,
    /// The last frame encoded (a broadcast encodes once).
    cached: Option<(ToRank, Line)>,
    in_tx: mpsc::UnboundedSender<Inbound>,
    acceptor: Option<JoinHandle<()>>,
    requeue: Option<String>,
    /// A service job: what its service task is told of the job.
    service: Option<tokio::sync::watch::Sender<super::service::JobView>>,
}

impl Master {
    async fn run(&mut self, in_rx: &mut mpsc::UnboundedReceiver<Inbound>) {
        let tick = Duration::from_millis(250);
        let mut hb = tokio::time::interval(self.settings.health.heartbeat_interval);
        let mut ticker = tokio::time::interval(tick);
        let mut batch_ticker = tokio::time::interval(Duration::from_secs(2));
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        loop {
            // heartbeats out first, then what arrived, then the clock: a queued message counts
            // before a rank's silence is judged
            let acts = tokio::select! {
                biased;
                _ = hb.tick() => {
                    let hb = channel::encode(&ToRank::Heartbeat);
                    for w in self.writers.values() {
                        w.send_line(hb.clone());
                    }
                    Vec::new()
                }
                Some(m) = in_rx.recv() => self.inbound(m),
                _ = batch_ticker.tick(), if self.settings.batch.is_some() => {
                    self.out.batch_poll(self.coord.plan(), false);
                    Vec::new()
                }
                _ = ticker.tick() => {
                    if stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        tracing::warn!("not every node reported its teardown complete; giving up waiting");
                        break;
                    }
                    self.coord.on_tick(Instant::now())
                }
            };
            let done = self.apply(acts);
            if !self.coord.in_rendezvous() {
                // every rank is in (or the job is over): nobody else may connect
                if let Some(a) = self.acceptor.take() {
                    a.abort();
                }
            }
            if self.coord.stopping() && stop_deadline.is_none() {
                let budget = self.settings.timeouts.teardown_budget + Duration::from_secs(2);
                stop_deadline = Some(tokio::time::Instant::now() + budget);
            }
            if done {
                break;
            }
        }
    }

    /// What arrived from the door or a rank, given to the core.
    fn inbound(&mut self, m: Inbound) -> Vec<Action> {
        let now = Instant::now();
        match m {
            Inbound::Hello {
                hello,
                tx,
                accepted,
                reply,
            } => match self.coord.on_hello(&hello, now) {
                Ok((rank, acts)) => {
                    tx.send_line(accepted);
                    self.writers.insert(rank, tx);
                    let _ = reply.send(Ok(rank));
                    acts
                }
                Err(e) => {
                    tracing::warn!(
                        "refused {} (node rank {}): {e}",
                        hello.node,
                        hello.node_rank
                    );
                    let _ = reply.send(Err(e));
                    Vec::new()
                }
            },
            Inbound::Refused { peer, reason } => {
                self.out.refused(peer, &reason);
                Vec::new()
            }
            Inbound::Msg(rank, msg) => self.coord.on_message(rank, msg, now),
            Inbound::Attached(res) => self.coord.on_attach_checked(res, now),
            Inbound::BatchChecked(res) => self.coord.on_batch_checked(res, now),
            Inbound::Handover(why) => self.coord.stop(crate::exit::SUCCESS, why, None),
            Inbound::Closed(rank) => {
                self.writers.remove(&rank);
                self.coord.on_closed(rank, now)
            }
        }
    }

    /// Carry out the core's actions; whether every rank has stopped.
    fn apply(&mut self, acts: Vec<Action>) -> bool {
        let mut done = false;
        for a in acts {
            match a {
                Action::Send(r, m) => self.send(r, m),
                Action::Event(event, node) => self.out.event(&event, node.as_deref()),
                Action::Endpoint {
                    status,
                    reason,
                    code,
                } => {
                    self.out
                        .endpoint(self.coord.plan(), status, reason.as_deref(), code);
                    if let Some(w) = &self.service {
                        let url = self.coord.plan().map(|p| p.url().to_string());
                        w.send_modify(|v| {
                            v.status = status;
                            v.reason.clone_from(&reason);
                            v.url = url;
                        });
                    }
                }
                Action::Replicas(v, dropped) => {
                    self.out.replicas = v;
                    self.out.dropped = dropped;
                    let (st, reason, code) = self.out.status.clone();
                    if !st.is_final() {
                        self.out
                            .endpoint(self.coord.plan(), st, reason.as_deref(), code);
                    }
                }
                Action::Drop(r) => {
                    self.writers.remove(&r);
                }
                Action::CheckAttach(all) => {
                    let tx = self.in_tx.clone();
                    let within = self.settings.policy.attach_timeout;
                    tokio::spawn(async move {
                        let res = crate::route::attach::check_all(&all, within)
                            .await
                            .map_err(|why| RunError::new(Kind::Attach, why));
                        let _ = tx.send(Inbound::Attached(res));
                    });
                }
                Action::CheckBatch => {
                    let tx = self.in_tx.clone();
                    let b = self.settings.batch.clone();
                    tokio::task::spawn_blocking(move || {
                        let res = b.map_or(Ok(0), |b| {
                            let path = std::path::Path::new(&b.input);
                            crate::batch::input::validate(
                                path,
                                &b.models,
                                crate::batch::input::Shard::ALL,
                                &Default::default(),
                            )
                            .map(|s| s.requests)
                        });
                        let _ = tx.send(Inbound::BatchChecked(res));
                    });
                }
                Action::Info(s) => tracing::info!("{s}"),
                Action::Warn(s) => tracing::warn!("{s}"),
                Action::AllStopped => done = true,
                Action::Requeue(why) => self.requeue = Some(why),
                Action::HandoverNow => match &self.service {
                    Some(w) => w.send_modify(|v| v.usr1 = true),
                    None => tracing::warn!(
                        "SIGUSR1 asked for a handover, but this job has no `service:`"
                    ),
                },
            }
        }
        done
    }

    fn send(&mut self, r: usize, m: ToRank) {
        let Some(w) = self.writers.get(&r) else {
            return;
        };
        let line = match &self.cached {
            Some((c, l)) if *c == m => l.clone(),
            _ => {
                let l = channel::encode(&m);
                self.cached = Some((m, l.clone()));
                l
            }
        };
        w.send_line(line);
    }

    /// After the loop: wake (or have Slurm kill) the nodes given up on as silent, remove the
    /// key file, requeue if asked.
    async fn finish(&mut self, in_rx: &mut mpsc::UnboundedReceiver<Inbound>) {
        if let Some(a) = self.acceptor.take() {
            a.abort();
        }
        let abandoned = self.coord.abandoned_ranks();
        if !abandoned.is_empty() {
            self.end_abandoned(abandoned, in_rx).await;
        }
        // the batch has exited: its last word goes into the endpoint file and the event log
        self.out.batch_poll(self.coord.plan(), true);
        if let Some(svc) = &self.settings.service {
            let (status, reason, _) = &self.out.status;
            super::service::finish(svc, &self.out.step.job_id, *status, reason.as_deref());
        }
        self.out.close();
        if let Some(why) = &self.requeue {
            outputs::requeue_job(&self.out.step, why).await;
        }
    }

    async fn end_abandoned(
        &mut self,
        abandoned: Vec<usize>,
        in_rx: &mut mpsc::UnboundedReceiver<Inbound>,
    ) {
        let names: Vec<String> = abandoned.iter().map(|r| self.coord.node(*r)).collect();
        let step = &self.out.step;
        if !crate::run::proc::wake_step(step, &names, Duration::from_secs(10)).await {
            return;
        }
        // a stopped launcher resumes, finds the job stopping and tears down: its
        // connection closes; one that does not within the budget is SIGKILLed by Slurm
        let mut waiting: BTreeSet<usize> = abandoned.into_iter().collect();
        let deadline = tokio::time::Instant::now() + self.settings.timeouts.teardown_budget;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, in_rx.recv()).await {
                Ok(Some(Inbound::Closed(r))) | Ok(Some(Inbound::Msg(r, ToMaster::Stopped))) => {
                    waiting.remove(&r);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if waiting.is_empty() {
            tracing::info!("{} stopped after all", names.join(", "));
        } else {
            crate::run::proc::kill_step(step, &names);
        }
    }
}
