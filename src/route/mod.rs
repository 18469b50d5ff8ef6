//! The router (`ray-launch route`): one OpenAI-compatible endpoint over the job's replicas.
//! The master's launcher runs it as a child like the engine (kind `router` in the plan), so a
//! fault here is a process that dies, seen and reported like any other, and the supervisor
//! stays small.
//!
//! Each request goes to the healthy replica with the fewest outstanding requests
//! ([`policy::pick`]). The request body is read first (at most `--max-body`), so a request
//! whose connection was refused can be sent to another replica; once a replica accepted the
//! connection the request is never sent again. Responses stream through as they come
//! (SSE included). `/health` and `/metrics` (Prometheus) are the router's own; everything
//! else needs the job's API key when it has one, and goes to a replica as it is.

pub mod policy;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The line the router prints once it listens (its lifecycle's ready point).
pub const LISTENING: &str = "router listening on";

/// The variable the router reads the job's API key from (never a flag: flags show in `ps`).
pub const API_KEY_VAR: &str = "RAY_LAUNCH_ROUTER_API_KEY";

#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// Each replica's base URL, without `/v1` (`http://10.0.0.2:20034`).
    pub replicas: Vec<String>,
    pub health_interval: Duration,
    pub health_failures: u32,
    pub max_body: usize,
    pub request_timeout: Duration,
    pub api_key: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    replica: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabel {
    reason: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<ReplicaLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    latency: Family<ReplicaLabel, Histogram>,
    healthy: Family<ReplicaLabel, Gauge>,
    outstanding: Family<ReplicaLabel, Gauge>,
    rejected: Family<RejectLabel, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ray_launch_router");
        let requests = Family::<ReplicaLabel, Counter>::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        let latency = Family::<ReplicaLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
        });
        let healthy = Family::<ReplicaLabel, Gauge>::default();
        let outstanding = Family::<ReplicaLabel, Gauge>::default();
        let rejected = Family::<RejectLabel, Counter>::default();
        registry.register(
            "requests",
            "Requests sent to each replica",
            requests.clone(),
        );
        registry.register(
            "errors",
            "Failed requests per replica: connect (refused, retried elsewhere), upstream (broke after it was sent), status (a 5xx answer)",
            errors.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from sending a request to a replica to the end of its response",
            latency.clone(),
        );
        registry.register(
            "replica_healthy",
            "1 while the router sends requests to the replica",
            healthy.clone(),
        );
        registry.register(
            "outstanding",
            "Requests in flight per replica",
            outstanding.clone(),
        );
        registry.register(
            "rejected",
            "Requests the router answered itself: unauthorized, too_large, no_replica",
            rejected.clone(),
        );
        Metrics {
            registry,
            requests,
            errors,
            latency,
            healthy,
            outstanding,
            rejected,
        }
    }
}

struct Replica {
    base: String,
    label: ReplicaLabel,
    health: Mutex<policy::Health>,
    outstanding: AtomicUsize,
    // this replica's metrics, looked up once (the families hash their labels on each lookup)
    m_requests: Counter,
    m_latency: Histogram,
    m_outstanding: Gauge,
    m_healthy: Gauge,
}

struct Shared {
    replicas: Vec<Replica>,
    turn: AtomicUsize,
    client: reqwest::Client,
    api_key: Option<String>,
    max_body: usize,
    metrics: Metrics,
}

fn log(msg: &str) {
    eprintln!(
        "{} router: {msg}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}

impl Shared {
    fn views(&self) -> Vec<policy::View> {
        self.replicas
            .iter()
            .map(|r| policy::View {
                healthy: r.health.lock().map(|h| h.healthy()).unwrap_or(false),
                outstanding: r.outstanding.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn note(&self, i: usize, change: Option<policy::Change>) {
        let r = &self.replicas[i];
        match change {
            Some(policy::Change::Up) => {
                r.m_healthy.set(1);
                log(&format!(
                    "replica {i} ({}) is healthy: sending requests to it",
                    r.base
                ));
            }
            Some(policy::Change::Down(why)) => {
                r.m_healthy.set(0);
                log(&format!("replica {i} ({}) left the router: {why}", r.base));
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

async fn handle(State(st): State<Arc<Shared>>, req: Request) -> Response {
    match req.uri().path() {
        "/health" => {
            return if st.views().iter().any(|v| v.healthy) {
                Response::new(Body::empty())
            } else {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "no replica is healthy",
                )
            };
        }
        "/metrics" => {
            let mut out = String::new();
            let _ = prometheus_client::encoding::text::encode(&mut out, &st.metrics.registry);
            return Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Body::from(out))
                .expect("a static response builds");
        }
        _ => {}
    }
    let reject = |reason: &str| {
        st.metrics
            .rejected
            .get_or_create(&RejectLabel {
                reason: reason.into(),
            })
            .inc();
    };
    if let Some(key) = &st.api_key {
        if !authorized(req.headers(), key) {
            reject("unauthorized");
            return error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "this endpoint needs the job's API key (Authorization: Bearer KEY; the key's file is the endpoint file's api_key_path)",
            );
        }
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, st.max_body).await {
        Ok(b) => b,
        Err(_) => {
            reject("too_large");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                &format!(
                    "the request body is larger than the router accepts ({} bytes; router.max_body)",
                    st.max_body
                ),
            );
        }
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let mut tried: Vec<usize> = Vec::new();
    loop {
        let start = st.turn.fetch_add(1, Ordering::Relaxed);
        let Some(i) = policy::pick(&st.views(), start, &tried) else {
            reject("no_replica");
            let why = if tried.is_empty() {
                "no replica is serving (they are starting or restarting)".to_string()
            } else {
                format!("no replica accepted the connection (tried {tried:?})")
            };
            return error(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", &why);
        };
        let r = &st.replicas[i];
        r.outstanding.fetch_add(1, Ordering::Relaxed);
        r.m_outstanding.inc();
        r.m_requests.inc();
        let flight = InFlight {
            shared: st.clone(),
            i,
            t0: Instant::now(),
        };
        let mut rb = st
            .client
            .request(parts.method.clone(), format!("{}{pq}", r.base))
            .body(bytes.clone());
        for (k, v) in parts.headers.iter() {
            if !hop_by_hop(k) {
                rb = rb.header(k, v);
            }
        }
        let err = |kind: &str| {
            st.metrics
                .errors
                .get_or_create(&ErrorLabel {
                    replica: r.label.replica.clone(),
                    kind: kind.into(),
                })
                .inc();
        };
        match rb.send().await {
            Ok(resp) => {
                if resp.status().is_server_error() {
                    err("status");
                }
                let mut out = Response::builder().status(resp.status());
                for (k, v) in resp.headers() {
                    if !hop_by_hop(k) {
                        out = out.header(k, v);
                    }
                }
                let st2 = st.clone();
                let stream = resp.bytes_stream().map(move |chunk| {
                    let _keep = &flight;
                    if chunk.is_err() {
                        st2.metrics
                            .errors
                            .get_or_create(&ErrorLabel {
                                replica: st2.replicas[i].label.replica.clone(),
                                kind: "upstream".into(),
                            })
                            .inc();
                    }
                    chunk
                });
                return out
                    .header(
                        HeaderName::from_static("x-ray-launch-replica"),
                        HeaderValue::from(i),
                    )
                    .body(Body::from_stream(stream))
                    .unwrap_or_else(|e| {
                        error(StatusCode::BAD_GATEWAY, "upstream_error", &e.to_string())
                    });
            }
            // nothing reached the replica: another one may take the request
            Err(e) if e.is_connect() => {
                err("connect");
                drop(flight);
                let change = r.health.lock().ok().and_then(|mut h| {
                    h.on_refused(format!("connection failed ({e})"), Instant::now())
                });
                st.note(i, change);
                tried.push(i);
            }
            // it may have started the request: never sent twice
            Err(e) => {
                err("upstream");
                let (status, what) = if e.is_timeout() {
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        "did not answer in time (router.request_timeout)",
                    )
                } else {
                    (StatusCode::BAD_GATEWAY, "failed while handling the request")
                };
                return error(
                    status,
                    "upstream_error",
                    &format!("replica {i} {what}: {e}"),
                );
            }
        }
    }
}

async fn poll(st: Arc<Shared>, i: usize, interval: Duration) {
    let url = format!("{}/health", st.replicas[i].base);
    let timeout = policy::poll_timeout(interval);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let res = match st.client.get(&url).timeout(timeout).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("/health answered {}", r.status())),
            Err(e) if e.is_timeout() => Err(format!(
                "/health did not answer within {}",
                humantime::format_duration(timeout)
            )),
            Err(e) => Err(format!("/health failed: {e}")),
        };
        let change = st.replicas[i]
            .health
            .lock()
            .ok()
            .and_then(|mut h| h.on_poll(res, Instant::now()));
        st.note(i, change);
    }
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
    let replicas: Vec<Replica> = o
        .replicas
        .iter()
        .enumerate()
        .map(|(i, base)| {
            let label = ReplicaLabel {
                replica: i.to_string(),
            };
            let m_healthy = metrics.healthy.get_or_create(&label).clone();
            m_healthy.set(0);
            Replica {
                base: base.trim_end_matches('/').to_string(),
                health: Mutex::new(policy::Health::new(o.health_failures)),
                outstanding: AtomicUsize::new(0),
                m_requests: metrics.requests.get_or_create(&label).clone(),
                m_latency: metrics.latency.get_or_create(&label).clone(),
                m_outstanding: metrics.outstanding.get_or_create(&label).clone(),
                m_healthy,
                label,
            }
        })
        .collect();
    let shared = Arc::new(Shared {
        replicas,
        turn: AtomicUsize::new(0),
        client,
        api_key: o.api_key.clone(),
        max_body: o.max_body,
        metrics,
    });
    let listener = tokio::net::TcpListener::bind(&o.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", o.listen))?;
    for i in 0..shared.replicas.len() {
        tokio::spawn(poll(shared.clone(), i, o.health_interval));
    }
    log(&format!(
        "{LISTENING} http://{} over {} replica(s): {}",
        o.listen,
        o.replicas.len(),
        o.replicas.join(" ")
    ));
    let app = axum::Router::new().fallback(handle).with_state(shared);
    use axum::serve::ListenerExt as _;
    // small writes (SSE chunks, short answers) go out at once
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
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
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| format!("the router stopped: {e}"))
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
