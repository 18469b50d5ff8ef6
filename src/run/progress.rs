//! Liveness from progress: a replica whose engine has requests running or waiting must
//! generate tokens; `/health` alone answers while generation has stopped (vllm#39863). Pure:
//! samples of the engine's `/metrics` and an explicit clock in, a verdict out.

use std::time::{Duration, Instant};

/// What one `/metrics` answer says: requests running or waiting, and tokens generated so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub busy: f64,
    pub tokens: f64,
}

/// Metric names (vLLM's, then SGLang's) summed over their labels.
const BUSY: &[&str] = &[
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
];
const TOKENS: &[&str] = &[
    "vllm:generation_tokens_total",
    "sglang:generation_tokens_total",
];

/// The sample in a Prometheus text answer; `None` when it has no token counter (an engine
/// without metrics: progress cannot be judged).
pub fn parse(text: &str) -> Option<Sample> {
    let mut busy = 0.0;
    let mut tokens = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if BUSY.contains(&name) {
            busy += v;
        } else if TOKENS.contains(&name) {
            *tokens.get_or_insert(0.0) += v;
        }
    }
    Some(Sample {
        busy,
        tokens: tokens?,
    })
}

/// One metric of a Prometheus text answer, summed over its label sets; `None` when absent.
pub fn sum_of(text: &str, metric: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Whether the engine makes progress: busy for `timeout` without one more token is a stall.
#[derive(Debug, Clone)]
pub struct Progress {
    timeout: Duration,
    tokens: Option<f64>,
    /// Since when it has been busy without a new token.
    since: Option<Instant>,
}

impl Progress {
    pub fn new(timeout: Duration) -> Progress {
        Progress {
            timeout,
            tokens: None,
            since: None,
        }
    }

    /// A sample at `now`: how long it has been stalled, once that is `timeout` or more.
    pub fn on_sample(&mut self, s: Sample, now: Instant) -> Option<Duration> {
        let advanced = self.tokens.is_none_or(|t| s.tokens > t);
        self.tokens = Some(s.tokens);
        if s.busy <= 0.0 || advanced {
            self.since = (s.busy > 0.0).then_some(now);
            return None;
        }
        let since = *self.since.get_or_insert(now);
        let stalled = now.saturating_duration_since(since);
        (stalled >= self.timeout).then_some(stalled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_and_sglang_metrics() {
        let v = "# HELP x\nvllm:num_requests_running{model_name=\"m\"} 2.0\nvllm:num_requests_waiting{model_name=\"m\"} 1.0\nvllm:generation_tokens_total{model_name=\"m\"} 1234.0\nvllm:generation_tokens_created 1.7e9\n";
        assert_eq!(
            parse(v),
            Some(Sample {
                busy: 3.0,
                tokens: 1234.0
            })
        );
        let s = "sglang:num_running_reqs{tp_rank=\"0\"} 1\nsglang:generation_tokens_total{tp_rank=\"0\"} 50\n";
        assert_eq!(
            parse(s),
            Some(Sample {
                busy: 1.0,
                tokens: 50.0
            })
        );
        assert_eq!(parse("process_cpu_seconds_total 3\n"), None);
    }

    #[test]
    fn busy_without_new_tokens_for_the_timeout_is_a_stall() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut p = Progress::new(10 * s);
        let at = |busy: f64, tokens: f64| Sample { busy, tokens };
        // idle: never a stall, however long the counter stands still
        assert_eq!(p.on_sample(at(0.0, 5.0), t0), None);
        assert_eq!(p.on_sample(at(0.0, 5.0), t0 + 100 * s), None);
        // busy and generating: fine
        assert_eq!(p.on_sample(at(2.0, 9.0), t0 + 101 * s), None);
        assert_eq!(p.on_sample(at(2.0, 20.0), t0 + 105 * s), None);
        // busy, the counter stops at 20 (last advance at 105 s)
        assert_eq!(p.on_sample(at(2.0, 20.0), t0 + 110 * s), None);
        assert_eq!(p.on_sample(at(2.0, 20.0), t0 + 115 * s), Some(10 * s));
        // a token resets it; going idle too
        assert_eq!(p.on_sample(at(2.0, 21.0), t0 + 116 * s), None);
        assert_eq!(p.on_sample(at(0.0, 21.0), t0 + 200 * s), None);
        assert_eq!(p.on_sample(at(1.0, 21.0), t0 + 201 * s), None);
        assert_eq!(p.on_sample(at(1.0, 21.0), t0 + 211 * s), Some(10 * s));
    }
}
