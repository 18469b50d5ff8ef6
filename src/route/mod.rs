//! The router (`ray-launch route`): one OpenAI-compatible endpoint over the job's replicas.
//! The master's launcher runs it as a child like the engine (kind `router` in the plan), so a
//! fault here is a process that dies, seen and reported like any other, and the supervisor
//! stays small.
//!
//! Each request goes to a healthy replica by the policy ([`policy`]): the one holding the
//! prompt's longest prefix or the client's session ([`prefix`]) within a load margin, else
//! the fewest outstanding requests. The request body is read first (at most `--max-body`), so
//! a request whose replica failed before any byte of its answer reached the client can be
//! sent to another ([`forward`]). Responses stream through as they come (SSE included). The
//! master's word on each replica comes from the job's endpoint file ([`state`]); a
//! service's router takes the chain's jobs into slots from the service file ([`service`]). `/health` and `/metrics` (Prometheus) are the router's own; everything
//! else needs the job's API key when it has one, and goes to a replica as it is.
//!
//! With several models (`--model`, and replicas named by model) a request goes to a replica
//! of the model its body's `model` field names (the served name or the entry's name; the
//! first model when there is none), or of the model its path names (`/models/NAME/v1/...`);
//! `GET /v1/models` lists them all; an unknown model is a 404. Attached endpoints
//! (`--attach`) are replicas the job does not run: polled on `/v1/models`, sent their own
//! key (never the job's).

pub mod attach;
mod forward;
mod metrics;
pub mod policy;
pub mod prefix;
mod resolve;
pub mod server;
mod service;
mod state;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::Response;
use futures_util::StreamExt as _;
use metrics::{Metrics, ReplicaLabel};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use resolve::Route;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The line the router prints once it listens (its lifecycle's ready point).
pub const LISTENING: &str = "router listening on";

/// The variable the router reads the job's API key from (never a flag: flags show in `ps`).
pub use crate::env_vars::RAY_LAUNCH_ROUTER_API_KEY as API_KEY_VAR;

/// One place a request can go.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Its model's name (`None`: the job's only model, no routing by name).
    pub model: Option<String>,
    /// Base URL without `/v1` (`http://10.0.0.2:20034`).
    pub base: String,
    /// Attached (not the job's): health from `/v1/models`, its own key instead of the job's.
    pub attached: bool,
    pub key_file: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    pub backends: Vec<Backend>,
    /// (name, served name) of each model when requests go by model name; empty: one model.
    pub models: Models,
    pub health_interval: Duration,
    /// How long one poll may take (at least the interval).
    pub health_timeout: Duration,
    pub health_failures: u32,
    pub max_body: usize,
    pub request_timeout: Duration,
    pub api_key: Option<String>,
    /// What one client may hold: connections, time, buffered bytes.
    pub limits: server::Limits,
    pub policy: policy::Policy,
    /// Another replica for a request that failed before its first byte, at most this often.
    pub retries: usize,
    /// What the prefix policy may remember, in bytes.
    pub prefix_memory: usize,
    /// How many more requests in flight than the least loaded a prefix's replica may have.
    pub prefix_margin: usize,
    /// The job's endpoint file: a replica serves only while the master says it is ready
    /// (`--replica` in the job's replica order).
    pub state_file: Option<std::path::PathBuf>,
    /// The Slurm job the replicas belong to (`x-ray-launch-job` on every answer).
    pub job: Option<String>,
    /// A service's directory: the backends are slots, each taking a job of the chain while
    /// the service file says it serves.
    pub service: Option<std::path::PathBuf>,
}

/// Each model's (name, served name), when requests go by name; empty for one model.
pub type Models = Vec<(String, String)>;

/// `--model NAME=SERVED`, `--replica [NAME=]URL`, `--attach NAME=URL` and
/// `--attach-key NAME=FILE` as the router's models and backends.
pub fn backends(
    models: &[String],
    replicas: &[String],
    attach: &[String],
    keys: &[String],
) -> Result<(Models, Vec<Backend>), String> {
    fn pair<'a>(flag: &str, v: &'a str) -> Result<(&'a str, &'a str), String> {
        v.split_once('=')
            .filter(|(n, x)| !n.is_empty() && !x.is_empty())
            .ok_or_else(|| format!("{flag} `{v}` is not NAME=VALUE"))
    }
    let mut named = Vec::new();
    for m in models {
        let (n, served) = pair("--model", m)?;
        named.push((n.to_string(), served.to_string()));
    }
    let known = |n: &str| named.iter().any(|(x, _)| x == n);
    let mut out = Vec::new();
    for r in replicas {
        // a bare URL has `:` or `/` before any `=`
        let (model, url) = match r.split_once('=') {
            Some((n, u)) if !n.contains([':', '/']) => {
                if !known(n) {
                    return Err(format!(
                        "--replica `{r}` names model `{n}`, which no --model gives"
                    ));
                }
                (Some(n.to_string()), u)
            }
            _ if !named.is_empty() => {
                return Err(format!(
                    "--replica `{r}` names no model, but --model is given: write NAME=URL"
                ))
            }
            _ => (None, r.as_str()),
        };
        out.push(Backend {
            model,
            base: url.trim_end_matches('/').to_string(),
            attached: false,
            key_file: None,
        });
    }
    for a in attach {
        let (n, url) = pair("--attach", a)?;
        if known(n)
            || out
                .iter()
                .any(|b| b.attached && b.model.as_deref() == Some(n))
        {
            return Err(format!("--attach `{a}`: the name `{n}` is taken"));
        }
        out.push(Backend {
            model: Some(n.to_string()),
            base: attach::base_of(url),
            attached: true,
            key_file: None,
        });
    }
    for k in keys {
        let (n, f) = pair("--attach-key", k)?;
        let b = out
            .iter_mut()
            .find(|b| b.attached && b.model.as_deref() == Some(n))
            .ok_or_else(|| format!("--attach-key `{k}` names no --attach"))?;
        b.key_file = Some(f.to_string());
    }
    if out.is_empty() {
        return Err("no --replica and no --attach: nothing to route to".into());
    }
    Ok((named, out))
}

struct Replica {
    /// Its base URL (a service router's slot takes each job's in turn; empty: a free slot).
    base: std::sync::RwLock<String>,
    /// The Slurm job it belongs to (`x-ray-launch-job`), when known.
    job: std::sync::RwLock<Option<String>>,
    label: ReplicaLabel,
    /// Which of `Shared::groups` it serves.
    group: usize,
    /// Attached: its own key (never the job's), and the model ids its `/v1/models` gave.
    attached: bool,
    key: Option<String>,
    ids: Mutex<Vec<String>>,
    health: Mutex<policy::Health>,
    outstanding: AtomicUsize,
    /// When the policy last chose it (`Shared::seq`).
    last_chosen: AtomicU64,
    /// Its engine's own `/v1/models` entry, fetched when it comes up (`GET /v1/models` is
    /// answered from it).
    card: Mutex<Option<serde_json::Value>>,
    // this replica's metrics, looked up once (the families hash their labels on each lookup)
    m_requests: Counter,
    m_latency: Histogram,
    m_outstanding: Gauge,
    m_healthy: Gauge,
}

/// One model: what clients call it and which replicas serve it.
struct Group {
    name: String,
    /// The name its engine serves it under (for an attached endpoint: the first id it lists).
    served: String,
    members: Vec<usize>,
    attached: bool,
}

struct Shared {
    replicas: Vec<Replica>,
    groups: Vec<Group>,
    /// Requests go by model name (several models, or attached endpoints).
    by_name: bool,
    /// Picks so far (what `last_chosen` counts in).
    seq: AtomicU64,
    policy: policy::Policy,
    retries: usize,
    keyer: prefix::Keyer,
    index: Mutex<prefix::Index>,
    prefix_margin: usize,
    client: reqwest::Client,
    api_key: Option<String>,
    max_body: usize,
    metrics: Metrics,
    /// Request bodies held now, against `--max-buffered`.
    buffered: Arc<server::Buffered>,
    body_timeout: Duration,
}

fn log(msg: &str) {
    eprintln!(
        "{} router: {msg}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}

impl resolve::Catalog for Shared {
    fn groups(&self) -> usize {
        self.groups.len()
    }
    fn name(&self, g: usize) -> &str {
        &self.groups[g].name
    }
    fn answers_to(&self, g: usize, model: &str) -> bool {
        Shared::answers_to(self, g, model)
    }
    fn target(&self, g: usize) -> String {
        Shared::target(self, g)
    }
    fn attached(&self, g: usize) -> bool {
        self.groups[g].attached
    }
}

impl Replica {
    fn base(&self) -> String {
        self.base.read().map(|b| b.clone()).unwrap_or_default()
    }

    fn job(&self) -> Option<String> {
        self.job.read().ok().and_then(|j| j.clone())
    }
}

impl Shared {
    /// `GET /health`: 200 while a replica is healthy.
    fn health(&self) -> Response {
        if (0..self.replicas.len()).any(|i| self.view(i).healthy) {
            Response::new(Body::empty())
        } else {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "no replica is healthy",
            )
        }
    }

    /// A 400 in OpenAI's format: a request the router does not pass on.
    fn bad(&self, why: &str) -> Response {
        self.metrics.reject("bad_request");
        error(StatusCode::BAD_REQUEST, "invalid_request_error", why)
    }

    /// A 404 in OpenAI's format for a model this router does not serve.
    fn unknown(&self, model: &str) -> Response {
        self.metrics.reject("unknown_model");
        let body = serde_json::json!({ "error": {
            "message": format!("The model `{model}` does not exist (this job serves {}).",
                self.groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ")),
            "type": "invalid_request_error", "param": "model", "code": "model_not_found",
        }});
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .expect("a static response builds")
    }

    fn view(&self, i: usize) -> policy::View {
        let r = &self.replicas[i];
        let (healthy, held) = r
            .health
            .lock()
            .map(|h| (h.healthy(), h.held()))
            .unwrap_or((false, true));
        policy::View {
            healthy,
            // a service router's free slot has nowhere to go
            held: held || r.base.read().map_or(true, |b| b.is_empty()),
            outstanding: r.outstanding.load(Ordering::Relaxed),
            last_chosen: r.last_chosen.load(Ordering::Relaxed),
        }
    }

    /// The names a group answers to: its name, its served name, and what an attached
    /// endpoint lists.
    fn answers_to(&self, g: usize, model: &str) -> bool {
        let grp = &self.groups[g];
        grp.name == model
            || grp.served == model
            || (grp.attached
                && grp.members.iter().any(|&i| {
                    self.replicas[i]
                        .ids
                        .lock()
                        .map(|ids| ids.iter().any(|x| x == model))
                        .unwrap_or(false)
                }))
    }

    /// What the engine behind group `g` calls its model.
    fn target(&self, g: usize) -> String {
        let grp = &self.groups[g];
        if grp.attached {
            if let Some(id) = grp.members.first().and_then(|&i| {
                self.replicas[i]
                    .ids
                    .lock()
                    .ok()
                    .and_then(|v| v.first().cloned())
            }) {
                return id;
            }
        }
        grp.served.clone()
    }

    /// `GET /v1/models` over the groups given: every model by the id clients use.
    fn model_list(&self, groups: &[usize]) -> Response {
        let data: Vec<serde_json::Value> = groups
            .iter()
            .map(|&g| {
                let grp = &self.groups[g];
                // the engine's own entry (max_model_len, root, ...) when one came up
                let card = grp
                    .members
                    .iter()
                    .find_map(|&i| self.replicas[i].card.lock().ok().and_then(|c| c.clone()));
                let mut v = card.unwrap_or_else(|| {
                    serde_json::json!({
                        "object": "model",
                        "created": 0,
                        "owned_by": if grp.attached { "attached" } else { "ray-launch" },
                    })
                });
                let id = match self.target(g) {
                    t if t.is_empty() => v["id"].as_str().unwrap_or_default().to_string(),
                    t => t,
                };
                v["id"] = id.into();
                if self.by_name {
                    v["name"] = grp.name.clone().into();
                }
                v
            })
            .filter(|v| v["id"].as_str().is_some_and(|id| !id.is_empty()))
            .collect();
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                serde_json::json!({ "object": "list", "data": data }).to_string(),
            ))
            .expect("a static response builds")
    }

    fn has_card(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.card.lock().is_ok_and(|c| c.is_some()))
    }

    /// Change replica `i`'s health; a change of rotation is logged and counted.
    fn update_health(
        &self,
        i: usize,
        f: impl FnOnce(&mut policy::Health) -> Option<policy::Change>,
    ) {
        let change = self.replicas[i]
            .health
            .lock()
            .ok()
            .and_then(|mut h| f(&mut h));
        self.note(i, change);
    }

    fn note(&self, i: usize, change: Option<policy::Change>) {
        let r = &self.replicas[i];
        match change {
            Some(policy::Change::Up) => {
                r.m_healthy.set(1);
                log(&format!(
                    "replica {i} ({}) is healthy: sending requests to it",
                    r.base()
                ));
            }
            Some(policy::Change::Down(why)) => {
                r.m_healthy.set(0);
                // its engine's cache is gone with it (or will be, when it restarts)
                if let Ok(mut ix) = self.index.lock() {
                    ix.forget(i);
                }
                log(&format!(
                    "replica {i} ({}) left the router: {why}",
                    r.base()
                ));
            }
            None => {}
        }
    }
}

/// An error in OpenAI's format (`{"error": {"message", "type", "code"}}`).
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": status.as_u16() }
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a static response builds")
}

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), and the
/// ones the client library sets again.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(token) = v.strip_prefix("Bearer ") else {
        return false;
    };
    token.as_bytes().ct_eq(key.as_bytes()).into()
}

/// Ends a request's accounting when its response body is done (or dropped by the client).
struct InFlight {
    shared: Arc<Shared>,
    i: usize,
    t0: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let r = &self.shared.replicas[self.i];
        r.outstanding.fetch_sub(1, Ordering::Relaxed);
        r.m_outstanding.dec();
        r.m_latency.observe(self.t0.elapsed().as_secs_f64());
    }
}

/// The request's body, read within `--body-timeout`, at most `--max-body`, and held against
/// `--max-buffered` (the hold goes with the request); else the answer to give.
async fn read_body(st: &Arc<Shared>, body: Body) -> Result<(bytes::Bytes, server::Hold), Response> {
    let mut hold = st.buffered.hold();
    let mut buf = bytes::BytesMut::new();
    let mut stream = body.into_data_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| "broken")?;
            if buf.len() + chunk.len() > st.max_body {
                return Err("too_large");
            }
            if !hold.add(chunk.len()) {
                return Err("busy");
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    let outcome = match tokio::time::timeout(st.body_timeout, read).await {
        Ok(r) => r,
        Err(_) => Err("slow"),
    };
    let reason = match outcome {
        Ok(()) => return Ok((buf.freeze(), hold)),
        Err(r) => r,
    };
    st.metrics.reject(reason);
    Err(match reason {
        "too_large" => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            &format!(
                "the request body is larger than the router accepts ({} bytes; router.max_body)",
                st.max_body
            ),
        ),
        "busy" => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                &format!(
                    "the router holds {} MiB of request bodies already (its cap): try again shortly",
                    st.buffered.cap() >> 20
                ),
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            r
        }
        "slow" => error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            &format!(
                "the request body did not arrive within {}",
                humantime::format_duration(st.body_timeout)
            ),
        ),
        _ => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the request body could not be read",
        ),
    })
}

async fn handle(State(st): State<Arc<Shared>>, req: Request) -> Response {
    match req.uri().path() {
        "/health" => return st.health(),
        "/metrics" => return st.metrics.response(),
        _ => {}
    }
    if let Some(key) = &st.api_key {
        if !authorized(req.headers(), key) {
            st.metrics.reject("unauthorized");
            return error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "this endpoint needs the job's API key (Authorization: Bearer KEY; the key's file is the endpoint file's api_key_path)",
            );
        }
    }
    let (parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    // `/models/NAME/...`: that model alone, whatever the body says
    let scope = match resolve::scope(&*st, st.by_name, &pq) {
        Ok(s) => s,
        Err(resolve::PathError::Unknown(name)) => return st.unknown(&name),
        Err(resolve::PathError::Bad(why)) => return st.bad(&why),
    };
    let (bytes, _hold) = match read_body(&st, body).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let get = parts.method == axum::http::Method::GET;
    match resolve::resolve(&*st, st.by_name, &scope, get, &bytes) {
        Route::List(groups) => st.model_list(&groups),
        // one model: the list from its engine's own entry, once a replica came up
        Route::To { .. } if get && !st.by_name && scope.pq == "/v1/models" && st.has_card() => {
            st.model_list(&[0])
        }
        Route::Unknown(m) => st.unknown(&m),
        Route::Bad(why) => st.bad(&why),
        Route::To { group, rewrite } => {
            let bytes = match rewrite {
                Some(to) => resolve::with_model(&bytes, &to),
                None => bytes,
            };
            forward::forward(st, parts, scope.pq, group, bytes).await
        }
    }
}

async fn poll(st: Arc<Shared>, i: usize, interval: Duration, timeout: Duration) {
    let r = &st.replicas[i];
    let timeout = policy::poll_timeout(interval).max(timeout);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_card: Option<Instant> = None;
    loop {
        tick.tick().await;
        let base = r.base();
        if base.is_empty() {
            // a service router's free slot
            continue;
        }
        let url = format!("{base}/health");
        let res = if r.attached {
            // an attached server: the check it passed before the job started
            match attach::probe(&st.client, &base, r.key.as_deref(), timeout).await {
                Ok(ids) => {
                    if let Ok(mut v) = r.ids.lock() {
                        *v = ids;
                    }
                    Ok(())
                }
                Err(why) => Err(format!("/v1/models {why}")),
            }
        } else {
            match st.client.get(&url).timeout(timeout).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("/health answered {}", r.status())),
                Err(e) if e.is_timeout() => Err(format!(
                    "/health did not answer within {}",
                    humantime::format_duration(timeout)
                )),
                Err(e) => Err(format!("/health failed: {e}")),
            }
        };
        let answered = res.is_ok();
        st.update_health(i, |h| h.on_poll(res, Instant::now()));
        // its engine's own `/v1/models` entry, once it answers (every 10 s until it gives one)
        let missing = !r.attached && r.card.lock().is_ok_and(|c| c.is_none());
        if answered && missing && last_card.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            last_card = Some(Instant::now());
            if let Some(card) = card(&st, i, timeout).await {
                if let Ok(mut c) = r.card.lock() {
                    *c = Some(card);
                }
            }
        }
    }
}

/// Replica `i`'s own `/v1/models` entry for the model it serves (with the job's key).
async fn card(st: &Shared, i: usize, timeout: Duration) -> Option<serde_json::Value> {
    let r = &st.replicas[i];
    let mut rb = st
        .client
        .get(format!("{}/v1/models", r.base()))
        .timeout(timeout);
    if let Some(k) = &st.api_key {
        rb = rb.bearer_auth(k);
    }
    let body = rb.send().await.ok()?.bytes().await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let served = &st.groups[r.group].served;
    let data = v["data"].as_array()?;
    data.iter()
        .find(|m| served.is_empty() || m["id"].as_str() == Some(served))
        .cloned()
}

/// The models (groups) and the replicas that serve them, from the options.
fn build(o: &Options, metrics: &Metrics) -> Result<(Vec<Group>, Vec<Replica>), String> {
    let mut groups: Vec<Group> = o
        .models
        .iter()
        .map(|(name, served)| Group {
            name: name.clone(),
            served: served.clone(),
            members: Vec::new(),
            attached: false,
        })
        .collect();
    if groups.is_empty() && o.backends.iter().any(|b| b.model.is_none()) {
        groups.push(Group {
            name: String::new(),
            served: String::new(),
            members: Vec::new(),
            attached: false,
        });
    }
    let mut replicas: Vec<Replica> = Vec::new();
    for (i, b) in o.backends.iter().enumerate() {
        let g = match (&b.model, b.attached) {
            (Some(n), true) => {
                groups.push(Group {
                    name: n.clone(),
                    served: n.clone(),
                    members: Vec::new(),
                    attached: true,
                });
                groups.len() - 1
            }
            (Some(n), false) => groups.iter().position(|g| &g.name == n).unwrap_or(0),
            (None, _) => 0,
        };
        groups[g].members.push(i);
        let key = match &b.key_file {
            Some(f) => Some(
                crate::auth::read_key_file(std::path::Path::new(f))
                    .map_err(|e| format!("the key of attached `{}`: {e}", groups[g].name))?,
            ),
            None => None,
        };
        let label = ReplicaLabel {
            replica: i.to_string(),
        };
        let m_healthy = metrics.healthy.get_or_create(&label).clone();
        m_healthy.set(0);
        replicas.push(Replica {
            base: std::sync::RwLock::new(b.base.trim_end_matches('/').to_string()),
            job: std::sync::RwLock::new(o.job.clone()),
            group: g,
            attached: b.attached,
            key,
            ids: Mutex::new(Vec::new()),
            health: Mutex::new(policy::Health::new(o.health_failures)),
            outstanding: AtomicUsize::new(0),
            last_chosen: AtomicU64::new(0),
            card: Mutex::new(None),
            m_requests: metrics.requests.get_or_create(&label).clone(),
            m_latency: metrics.latency.get_or_create(&label).clone(),
            m_outstanding: metrics.outstanding.get_or_create(&label).clone(),
            m_healthy,
            label,
        });
    }
    Ok((groups, replicas))
}

/// Serve until killed. `Err`: cannot listen (the message says why).
pub async fn serve(o: Options) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(o.request_timeout)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let metrics = Metrics::new();
    let by_name = !o.models.is_empty() || o.backends.iter().any(|b| b.attached);
    let (groups, replicas) = build(&o, &metrics)?;
    let shown: Vec<String> = replicas
        .iter()
        .map(|r| match (by_name, r.attached) {
            (false, _) if o.service.is_some() => format!("slot {}", r.label.replica),
            (false, _) => r.base(),
            (true, false) => format!("{}={}", groups[r.group].name, r.base()),
            (true, true) => format!("{}={} (attached)", groups[r.group].name, r.base()),
        })
        .collect();
    let shared = Arc::new(Shared {
        replicas,
        groups,
        by_name,
        seq: AtomicU64::new(0),
        policy: o.policy,
        retries: o.retries,
        keyer: prefix::Keyer::default(),
        index: Mutex::new(prefix::Index::new(o.prefix_memory)),
        prefix_margin: o.prefix_margin,
        client,
        api_key: o.api_key.clone(),
        max_body: o.max_body,
        metrics,
        buffered: server::Buffered::new(o.limits.max_buffered),
        body_timeout: o.limits.body_timeout,
    });
    let listener = tokio::net::TcpListener::bind(&o.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", o.listen))?;
    for i in 0..shared.replicas.len() {
        tokio::spawn(poll(shared.clone(), i, o.health_interval, o.health_timeout));
    }
    if let Some(f) = &o.state_file {
        tokio::spawn(state::watch(shared.clone(), f.clone()));
    }
    if let Some(dir) = &o.service {
        service::hold_all(&shared);
        tokio::spawn(service::follow(shared.clone(), dir.clone()));
    }
    log(&format!(
        "{LISTENING} http://{} over {} replica(s): {} (policy {}, {} retries)",
        o.listen,
        shown.len(),
        shown.join(" "),
        o.policy.as_str(),
        o.retries
    ));
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone());
    // SIGTERM (the launcher's teardown, or Slurm signalling the whole step): stop accepting,
    // let the requests in flight finish (the launcher SIGKILLs after its grace)
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
        log("SIGTERM: no new connections; finishing the requests in flight");
    };
    let over_cap = move || shared.metrics.reject("too_many_connections");
    server::serve(listener, app, o.limits, stop, over_cap).await;
    Ok(())
}

/// `ray-launch route`: its own runtime (two worker threads), the key from the environment.
pub fn main(mut o: Options) -> i32 {
    if o.api_key.is_none() {
        o.api_key = std::env::var(API_KEY_VAR).ok().filter(|k| !k.is_empty());
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log(&format!("cannot start the async runtime: {e}"));
            return crate::exit::INTERNAL;
        }
    };
    match rt.block_on(serve(o)) {
        Ok(()) => crate::exit::SUCCESS,
        Err(e) => {
            log(&format!("error: {e}"));
            crate::exit::LAUNCH_FAILURE
        }
    }
}
