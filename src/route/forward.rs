//! Forwarding a request to a replica of its model: the pick (the policy's), and another
//! replica when the first failed before any byte of its answer reached the client (refused,
//! reset, no headers, a 502/503 of its own, a body that broke before its first chunk), at
//! most `--retries` times; a refused connection reached nobody and does not count (every
//! replica may be tried; all refused: 503). After the first byte, a failure is told in the
//! answer (an SSE error event, or a cut body). A non-streamed answer is read whole before it
//! is passed on (up to [`WHOLE`] bytes), so its failure is still before the first byte.

use super::{error, hop_by_hop, policy, prefix, InFlight, Shared};
use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A non-streamed answer up to this size is read whole before the client sees a byte of it.
const WHOLE: usize = 16 << 20;

/// The headers an attached server (one outside the job) is sent: the body's type, what the
/// client accepts, and OpenAI's own; `Authorization` is set by the router (that server's key).
fn to_attached(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(n, "content-type" | "accept" | "user-agent" | "x-request-id")
        || n.starts_with("openai-")
        || n.starts_with("x-stainless-")
}

/// What one try at a replica came to.
enum Try {
    /// The client's answer (the replica's, or a failure that may not be retried).
    Answer(Response),
    /// Nothing reached the client: another replica may take the request. The reason (for
    /// `/metrics`) and the answer to give if none is left.
    Again(&'static str, Response),
}

/// Send the request (path and query `pq`, body `bytes`) to a replica of `group` (none: of
/// any) and stream its answer back.
pub(super) async fn forward(
    st: Arc<Shared>,
    parts: Parts,
    pq: String,
    group: Option<usize>,
    bytes: bytes::Bytes,
) -> Response {
    let members: Vec<usize> = match group {
        Some(g) => st.groups[g].members.clone(),
        None => (0..st.replicas.len()).collect(),
    };
    let keys = affinity_keys(&st, &parts, &bytes);
    let mut tried: Vec<usize> = Vec::new();
    // the answer of the last try that reached a replica, and how many did
    let (mut last, mut reached): (Option<Response>, usize) = (None, 0);
    loop {
        let Some(i) = pick(&st, &members, &tried, keys.as_ref()) else {
            return last.unwrap_or_else(|| none_left(&st, group, &tried));
        };
        match attempt(&st, i, &parts, &pq, &bytes).await {
            Try::Answer(r) => return r,
            Try::Again(why, answer) => {
                st.metrics.retry(&st.replicas[i].label.replica, why);
                tried.push(i);
                // a refused connection reached nobody: it does not count against the retries
                if why != "connect" {
                    reached += 1;
                    if reached > st.retries {
                        return answer;
                    }
                    last = Some(answer);
                }
            }
        }
    }
}

/// The request's prefix and session keys, under the prefix policy.
fn affinity_keys(st: &Shared, parts: &Parts, bytes: &[u8]) -> Option<prefix::Keys> {
    if st.policy != policy::Policy::Prefix || parts.method != axum::http::Method::POST {
        return None;
    }
    let (text, user) = prefix::prompt_of(bytes)?;
    let header = parts.headers.get("x-session-id").map(HeaderValue::as_bytes);
    let session = header.or(user.as_deref().map(str::as_bytes));
    Some(st.keyer.keys(text, session))
}

/// The member for this try (not tried yet), by the router's policy; it is marked chosen.
fn pick(
    st: &Shared,
    members: &[usize],
    tried: &[usize],
    keys: Option<&prefix::Keys>,
) -> Option<usize> {
    let views: Vec<policy::View> = members.iter().map(|&i| st.view(i)).collect();
    let skip: Vec<usize> = (0..members.len())
        .filter(|k| tried.contains(&members[*k]))
        .collect();
    let local = |r: usize| members.iter().position(|&m| m == r);
    let chosen = match keys {
        None => policy::pick(&views, &skip).map(|k| (members[k], policy::By::Load)),
        Some(keys) => {
            let mut index = st.index.lock().unwrap_or_else(|p| p.into_inner());
            let found = index.find(keys);
            let session = found.session.and_then(local);
            let prefixes: Vec<(usize, usize)> = found
                .prefixes
                .iter()
                .filter_map(|&(r, d)| local(r).map(|k| (k, d)))
                .collect();
            let c = policy::pick_affine(&views, &skip, session, &prefixes, st.prefix_margin)
                .map(|(k, by)| (members[k], by));
            if let Some((i, _)) = c {
                index.record(keys, i);
            }
            c
        }
    };
    let (i, by) = chosen?;
    st.metrics.routed(by);
    let seq = st.seq.fetch_add(1, Ordering::Relaxed) + 1;
    st.replicas[i].last_chosen.store(seq, Ordering::Relaxed);
    Some(i)
}

/// The 503 when no replica (of the model) can take the request.
fn none_left(st: &Shared, group: Option<usize>, tried: &[usize]) -> Response {
    st.metrics.reject("no_replica");
    let of = match group {
        Some(g) if st.by_name => format!(" of model `{}`", st.groups[g].name),
        _ => String::new(),
    };
    let why = if tried.is_empty() {
        format!("no replica{of} is serving (they are starting or restarting)")
    } else {
        format!("no replica{of} accepted the connection (tried {tried:?})")
    };
    error(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", &why)
}

/// One try at replica `i`: sent, and its answer up to the first byte the client would see.
async fn attempt(st: &Arc<Shared>, i: usize, parts: &Parts, pq: &str, bytes: &bytes::Bytes) -> Try {
    let r = &st.replicas[i];
    r.outstanding.fetch_add(1, Ordering::Relaxed);
    r.m_outstanding.inc();
    r.m_requests.inc();
    let flight = InFlight {
        shared: st.clone(),
        i,
        t0: Instant::now(),
    };
    match upstream(st, i, parts, pq, bytes).send().await {
        Ok(resp) => answer(st, i, resp, flight).await,
        Err(e) => send_failed(st, i, e),
    }
}

/// A send that got no answer: whether another replica may take the request.
fn send_failed(st: &Shared, i: usize, e: reqwest::Error) -> Try {
    let r = &st.replicas[i];
    if e.is_connect() {
        // nothing reached the replica
        st.metrics.error(&r.label.replica, "connect");
        st.update_health(i, |h| {
            h.on_refused(format!("connection failed ({e})"), Instant::now())
        });
        return Try::Again("connect", upstream_failed(i, e));
    }
    st.metrics.error(&r.label.replica, "upstream");
    if e.is_timeout() {
        // the whole time it had: a second try would wait as long again
        return Try::Answer(upstream_failed(i, e));
    }
    // reset, or closed before its headers: the client has seen nothing
    Try::Again("upstream", upstream_failed(i, e))
}

/// The replica's answer, read up to its start (the first chunk of a stream, the whole of a
/// plain answer): a failure until then may go to another replica; after it, the rest is
/// passed on as it comes.
async fn answer(st: &Arc<Shared>, i: usize, resp: reqwest::Response, flight: InFlight) -> Try {
    let label = &st.replicas[i].label.replica;
    let status = resp.status();
    if status.is_server_error() {
        st.metrics.error(label, "status");
    }
    let sse = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    let head = head_of(&resp, i, st.replicas[i].job());
    let mut body = resp.bytes_stream();
    let mut start = bytes::BytesMut::new();
    loop {
        if sse && !start.is_empty() || !sse && start.len() > WHOLE {
            break;
        }
        match body.next().await {
            Some(Ok(c)) => start.extend_from_slice(&c),
            Some(Err(e)) => {
                st.metrics.error(label, "upstream");
                if e.is_timeout() {
                    return Try::Answer(upstream_failed(i, e));
                }
                return Try::Again("upstream", upstream_failed(i, e));
            }
            None => {
                // the engine's own shutdown (502/503): another replica may answer
                if matches!(status.as_u16(), 502 | 503) {
                    return Try::Again("status", whole(head, start.freeze()));
                }
                return Try::Answer(whole(head, start.freeze()));
            }
        }
    }
    let body = passed_on(st, i, start.freeze(), body, flight, sse);
    Try::Answer(
        head.body(body)
            .unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, "upstream_error", &e.to_string())),
    )
}

/// The answer's start, then the rest as it comes; a failure in the rest is told the client's
/// way (an SSE error event, or a cut body). `flight` lives as long as the body streams.
fn passed_on(
    st: &Arc<Shared>,
    i: usize,
    start: bytes::Bytes,
    body: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
    flight: InFlight,
    sse: bool,
) -> Body {
    let st2 = st.clone();
    let first = futures_util::stream::iter([Ok::<_, std::io::Error>(start)]);
    let rest = body.map(move |chunk| {
        let _keep = &flight;
        chunk.map_err(|e| {
            st2.metrics
                .error(&st2.replicas[i].label.replica, "upstream");
            std::io::Error::other(format!(
                "replica {i} failed mid-answer: {}",
                e.without_url()
            ))
        })
    });
    let stream = first.chain(rest);
    if !sse {
        return Body::from_stream(stream);
    }
    // a failure after the first event: one SSE error event, then the end
    Body::from_stream(stream.scan(false, move |failed, c| {
        let out = match (*failed, c) {
            (true, _) => None,
            (false, Ok(b)) => Some(Ok::<_, std::io::Error>(b)),
            (false, Err(e)) => {
                *failed = true;
                Some(Ok(sse_error(&e.to_string())))
            }
        };
        std::future::ready(out)
    }))
}

/// The answer's status and headers as the client gets them, naming the replica and the job
/// (a job's router behind a service's router named them already: its names are kept).
fn head_of(
    resp: &reqwest::Response,
    i: usize,
    job: Option<String>,
) -> axum::http::response::Builder {
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if !hop_by_hop(k) {
            out = out.header(k, v);
        }
    }
    let has = |h: &str| resp.headers().contains_key(h);
    if !has(REPLICA_HEADER) {
        out = out.header(
            HeaderName::from_static(REPLICA_HEADER),
            HeaderValue::from(i),
        );
    }
    if let Some(job) = job.filter(|_| !has(JOB_HEADER)) {
        if let Ok(v) = HeaderValue::from_str(&job) {
            out = out.header(HeaderName::from_static(JOB_HEADER), v);
        }
    }
    out
}

const REPLICA_HEADER: &str = "x-ray-launch-replica";
const JOB_HEADER: &str = "x-ray-launch-job";

fn whole(head: axum::http::response::Builder, b: bytes::Bytes) -> Response {
    head.body(Body::from(b))
        .unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, "upstream_error", &e.to_string()))
}

/// An error event in OpenAI's streaming shape (`data: {"error": ...}`).
fn sse_error(message: &str) -> bytes::Bytes {
    let body = serde_json::json!({
        "error": { "message": message, "type": "upstream_error", "param": null, "code": 502 }
    });
    bytes::Bytes::from(format!("data: {body}\n\n"))
}

/// The request as replica `i` gets it: a server outside the job gets only what an OpenAI
/// request needs, never the job's key (it gets its own, or none), cookies or other
/// credentials.
fn upstream(
    st: &Shared,
    i: usize,
    parts: &Parts,
    pq: &str,
    bytes: &bytes::Bytes,
) -> reqwest::RequestBuilder {
    let r = &st.replicas[i];
    let mut rb = st
        .client
        .request(parts.method.clone(), format!("{}{pq}", r.base()))
        .body(bytes.clone());
    for (k, v) in parts.headers.iter() {
        let pass = if r.attached {
            to_attached(k)
        } else {
            !hop_by_hop(k)
        };
        if pass {
            rb = rb.header(k, v);
        }
    }
    if let (true, Some(key)) = (r.attached, &r.key) {
        rb = rb.bearer_auth(key);
    }
    rb
}

/// A replica that failed: 504 past the request timeout, else 502; the replica by number (its
/// internal address is not the client's business).
fn upstream_failed(i: usize, e: reqwest::Error) -> Response {
    let (status, what) = if e.is_timeout() {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "did not answer in time (router.request_timeout)",
        )
    } else if e.is_connect() {
        (StatusCode::BAD_GATEWAY, "refused the connection")
    } else {
        (StatusCode::BAD_GATEWAY, "failed while handling the request")
    };
    error(
        status,
        "upstream_error",
        &format!("replica {i} {what}: {}", e.without_url()),
    )
}
