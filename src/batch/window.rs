//! Pure: how many requests a batch keeps in flight. `auto` follows the engines' own queue
//! gauges (vLLM `vllm:num_requests_waiting`, SGLang `sglang:num_queue_reqs`, summed over the
//! replicas): it grows while the window is full and the engines queue less than one request
//! per replica, and shrinks when they queue more than a few. Every replica stays busy (a
//! request waits for each slot that frees) without long queues. A number pins it.

/// The window's bounds for `auto`, per replica.
pub const START_PER_REPLICA: usize = 8;
pub const MAX_PER_REPLICA: usize = 1024;
/// Without queue gauges (an engine that exposes neither), `auto` holds this many per replica.
pub const BLIND_PER_REPLICA: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    limit: usize,
    fixed: bool,
    replicas: usize,
}

impl Window {
    pub fn auto(replicas: usize) -> Window {
        let replicas = replicas.max(1);
        Window {
            limit: START_PER_REPLICA * replicas,
            fixed: false,
            replicas,
        }
    }

    pub fn fixed(n: usize) -> Window {
        Window {
            limit: n.max(1),
            fixed: true,
            replicas: 1,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// A reading of the engines' queues: `waiting` requests queued over all replicas (None:
    /// no replica exposes a queue gauge), while `in_flight` of ours were outstanding.
    pub fn on_sample(&mut self, waiting: Option<u64>, in_flight: usize) {
        if self.fixed {
            return;
        }
        let r = self.replicas as u64;
        let max = MAX_PER_REPLICA * self.replicas;
        let Some(waiting) = waiting else {
            self.limit = BLIND_PER_REPLICA * self.replicas;
            return;
        };
        if waiting < r && in_flight >= self.limit {
            // the engines take all we send: send more
            self.limit = (self.limit + (self.limit / 4).max(1)).min(max);
        } else if waiting > 4 * r {
            // a queue is building: give back half of what waits beyond two per replica
            let over = usize::try_from((waiting - 2 * r) / 2).unwrap_or(usize::MAX);
            self.limit = self.limit.saturating_sub(over).max(self.replicas);
        }
    }
}

/// The queue gauge from an engine's Prometheus text: vLLM's or SGLang's, summed over their
/// label sets (one per model); None when the text has neither.
pub fn waiting_from_metrics(text: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line
            .strip_prefix("vllm:num_requests_waiting")
            .or_else(|| line.strip_prefix("sglang:num_queue_reqs"))
        else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0) += v.max(0.0) as u64;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replicas with `slots` each: what they queue when `sent` are outstanding.
    fn queued(sent: usize, replicas: usize, slots: usize) -> u64 {
        sent.saturating_sub(replicas * slots) as u64
    }

    #[test]
    fn auto_settles_just_above_the_engines_capacity() {
        for (replicas, slots) in [(1, 16), (3, 16), (2, 200)] {
            let mut w = Window::auto(replicas);
            for _ in 0..200 {
                let sent = w.limit(); // the window is kept full
                w.on_sample(Some(queued(sent, replicas, slots)), sent);
            }
            let cap = replicas * slots;
            assert!(
                w.limit() >= cap,
                "{replicas}x{slots}: {} below {cap}",
                w.limit()
            );
            assert!(
                w.limit() <= cap + 5 * replicas,
                "{replicas}x{slots}: {} queues long",
                w.limit()
            );
        }
    }

    #[test]
    fn it_does_not_grow_when_the_window_is_not_full_and_fixed_never_moves() {
        let mut w = Window::auto(2);
        w.on_sample(Some(0), 3);
        assert_eq!(w.limit(), 16);
        let mut f = Window::fixed(5);
        f.on_sample(Some(0), 5);
        f.on_sample(Some(1000), 5);
        assert_eq!(f.limit(), 5);
        let mut blind = Window::auto(3);
        blind.on_sample(None, 24);
        assert_eq!(blind.limit(), 96);
    }

    #[test]
    fn queue_gauges_of_both_engines() {
        let vllm = "# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{model_name=\"a\"} 3.0\nvllm:num_requests_waiting_by_reason{r=\"x\"} 9\nvllm:num_requests_running{model_name=\"a\"} 7.0\n";
        assert_eq!(waiting_from_metrics(vllm), Some(3));
        assert_eq!(
            waiting_from_metrics(
                "sglang:num_queue_reqs{m=\"x\"} 2\nsglang:num_queue_reqs{m=\"y\"} 1\n"
            ),
            Some(3)
        );
        assert_eq!(waiting_from_metrics("up 1\n"), None);
    }
}
