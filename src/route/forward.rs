//! Forwarding a request to a replica of its model: the pick (fewest outstanding among the
//! healthy), another replica when the connection is refused, never twice once sent, and the
//! response streamed back.

use super::{error, hop_by_hop, policy, InFlight, Shared};
use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// The headers an attached server (one outside the job) is sent: the body's type, what the
/// client accepts, and OpenAI's own; `Authorization` is set by the router (that server's key).
fn to_attached(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(n, "content-type" | "accept" | "user-agent" | "x-request-id")
        || n.starts_with("openai-")
        || n.starts_with("x-stainless-")
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
    let mut tried: Vec<usize> = Vec::new();
    loop {
        let i = match pick(&st, &members, &tried) {
            Some(i) => i,
            None => return none_left(&st, group, &tried),
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
        match upstream(&st, i, &parts, &pq, &bytes).send().await {
            Ok(resp) => return stream_back(&st, i, resp, flight),
            // nothing reached the replica: another one may take the request
            Err(e) if e.is_connect() => {
                st.metrics.error(&r.label.replica, "connect");
                drop(flight);
                let change = r.health.lock().ok().and_then(|mut h| {
                    h.on_refused(format!("connection failed ({e})"), Instant::now())
                });
                st.note(i, change);
                tried.push(i);
            }
            // it may have started the request: never sent twice
            Err(e) => {
                st.metrics.error(&r.label.replica, "upstream");
                return upstream_failed(i, e);
            }
        }
    }
}

/// The healthy member with the fewest requests in flight, of those not tried yet.
fn pick(st: &Shared, members: &[usize], tried: &[usize]) -> Option<usize> {
    let start = st.turn.fetch_add(1, Ordering::Relaxed);
    let views: Vec<policy::View> = members.iter().map(|&i| st.view(i)).collect();
    let skip: Vec<usize> = (0..members.len())
        .filter(|k| tried.contains(&members[*k]))
        .collect();
    policy::pick(&views, start, &skip).map(|k| members[k])
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
        .request(parts.method.clone(), format!("{}{pq}", r.base))
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

/// Replica `i`'s answer, streamed through; the request's accounting ends with its body.
fn stream_back(st: &Arc<Shared>, i: usize, resp: reqwest::Response, flight: InFlight) -> Response {
    if resp.status().is_server_error() {
        st.metrics.error(&st.replicas[i].label.replica, "status");
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
                .error(&st2.replicas[i].label.replica, "upstream");
        }
        chunk
    });
    out.header(
        HeaderName::from_static("x-ray-launch-replica"),
        HeaderValue::from(i),
    )
    .body(Body::from_stream(stream))
    .unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, "upstream_error", &e.to_string()))
}

/// A replica that took the request and then failed: 504 past the request timeout, else 502;
/// the replica by number (its internal address is not the client's business).
fn upstream_failed(i: usize, e: reqwest::Error) -> Response {
    let (status, what) = if e.is_timeout() {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "did not answer in time (router.request_timeout)",
        )
    } else {
        (StatusCode::BAD_GATEWAY, "failed while handling the request")
    };
    error(
        status,
        "upstream_error",
        &format!("replica {i} {what}: {}", e.without_url()),
    )
}
