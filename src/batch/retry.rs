//! Pure: what to do after one attempt of a request — done, failed for good, or again after a
//! back-off. No clock inside: the caller says which attempt it was and brings the jitter.

use std::time::Duration;

/// What one attempt got.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An HTTP answer (its status; `Retry-After` when the server gave one).
    Answer {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: refused, reset, a timeout, a body cut off.
    Transport(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A 2xx answer: goes to OUT.
    Done,
    /// Goes to OUT.errors: a final answer (4xx: the request itself is wrong) or the last
    /// allowed attempt of a retriable failure.
    Final,
    /// Send it again after this long.
    Retry(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_attempts: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
        }
    }
}

/// Statuses worth another try: a timeout, too many requests, and the server-side failures
/// a replica's death or restart produces (the router's 502/503, an engine's 500 mid-shutdown).
pub fn retriable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl Policy {
    /// After attempt number `attempt` (1 for the first) ended with `o`; `jitter` in [0, 1)
    /// spreads the back-offs of many requests that failed together.
    pub fn judge(&self, attempt: u32, o: &Outcome, jitter: f64) -> Verdict {
        let retry_after = match o {
            Outcome::Answer { status, .. } if (200..300).contains(status) => return Verdict::Done,
            Outcome::Answer { status, .. } if !retriable_status(*status) => return Verdict::Final,
            Outcome::Answer { retry_after, .. } => *retry_after,
            Outcome::Transport(_) => None,
        };
        if attempt >= self.max_attempts {
            return Verdict::Final;
        }
        let exp = self.base.saturating_mul(1u32 << (attempt - 1).min(16));
        let backoff = exp
            .min(self.cap)
            .mul_f64(0.5 + jitter.clamp(0.0, 1.0) * 0.5);
        Verdict::Retry(backoff.max(retry_after.unwrap_or_default().min(self.cap)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16) -> Outcome {
        Outcome::Answer {
            status,
            retry_after: None,
        }
    }

    #[test]
    fn two_hundreds_are_done_and_client_errors_are_final_at_once() {
        let p = Policy::default();
        assert_eq!(p.judge(1, &answer(200), 0.0), Verdict::Done);
        for s in [400, 401, 404, 413, 422, 501] {
            assert_eq!(p.judge(1, &answer(s), 0.0), Verdict::Final, "{s}");
        }
    }

    #[test]
    fn retriable_failures_back_off_doubling_until_the_last_attempt() {
        let p = Policy::default();
        let refused = Outcome::Transport("connection refused".into());
        assert_eq!(
            p.judge(1, &refused, 1.0),
            Verdict::Retry(Duration::from_secs(1))
        );
        assert_eq!(
            p.judge(2, &answer(503), 1.0),
            Verdict::Retry(Duration::from_secs(2))
        );
        assert_eq!(
            p.judge(2, &answer(502), 0.0),
            Verdict::Retry(Duration::from_secs(1)),
            "jitter halves at most"
        );
        assert_eq!(
            p.judge(3, &answer(429), 0.5),
            Verdict::Final,
            "max_attempts 3"
        );
        let many = Policy {
            max_attempts: 40,
            ..p
        };
        assert_eq!(
            many.judge(30, &refused, 1.0),
            Verdict::Retry(Duration::from_secs(30)),
            "capped"
        );
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let p = Policy::default();
        let o = Outcome::Answer {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(p.judge(1, &o, 0.0), Verdict::Retry(Duration::from_secs(7)));
        let o = Outcome::Answer {
            status: 429,
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(p.judge(1, &o, 0.0), Verdict::Retry(Duration::from_secs(30)));
    }
}
