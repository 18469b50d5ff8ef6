//! The router's own metrics (`/metrics`, Prometheus text): requests, errors, latency,
//! health and requests in flight per replica, and what the router answered itself.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReplicaLabel {
    pub(super) replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ErrorLabel {
    pub(super) replica: String,
    pub(super) kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RetryLabel {
    pub(super) replica: String,
    pub(super) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RoutedLabel {
    pub(super) by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RejectLabel {
    pub(super) reason: String,
}

pub(super) struct Metrics {
    registry: Registry,
    pub(super) requests: Family<ReplicaLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    pub(super) latency: Family<ReplicaLabel, Histogram>,
    pub(super) healthy: Family<ReplicaLabel, Gauge>,
    pub(super) outstanding: Family<ReplicaLabel, Gauge>,
    rejected: Family<RejectLabel, Counter>,
    retries: Family<RetryLabel, Counter>,
    // why replicas were chosen (`policy::By` in order), looked up once
    routed_by: [Counter; 3],
}

impl Metrics {
    pub(super) fn new() -> Metrics {
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
        let retries = Family::<RetryLabel, Counter>::default();
        let routed = Family::<RoutedLabel, Counter>::default();
        registry.register(
            "retries",
            "Requests sent to another replica because this one failed before the first byte of its answer: connect, upstream (reset, no headers, a broken body), status (its own 502/503)",
            retries.clone(),
        );
        registry.register(
            "routed",
            "Why each replica was chosen: load (fewest in flight), prefix (it holds the prompt's longest prefix), session (the client's key)",
            routed.clone(),
        );
        let routed_by = ["load", "prefix", "session"]
            .map(|by| routed.get_or_create(&RoutedLabel { by: by.into() }).clone());
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
            retries,
            routed_by,
        }
    }
}

impl Metrics {
    /// A request the router answered itself (`unauthorized`, `too_large`, `no_replica`,
    /// `unknown_model`).
    pub(super) fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&RejectLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// A failed request to `replica`: `connect`, `upstream` or `status`.
    pub(super) fn error(&self, replica: &str, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                replica: replica.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// A request that goes to another replica: `replica` failed it before its first byte.
    pub(super) fn retry(&self, replica: &str, reason: &str) {
        self.retries
            .get_or_create(&RetryLabel {
                replica: replica.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// A replica chosen, and why.
    pub(super) fn routed(&self, by: super::policy::By) {
        self.routed_by[by as usize].inc();
    }

    /// `GET /metrics`.
    pub(super) fn response(&self) -> Response {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Body::from(out))
            .expect("a static response builds")
    }
}
