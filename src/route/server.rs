//! The router's HTTP server, bounded: at most `max_connections` open (over it a new one is
//! closed at once and the others are served), a deadline for a request's headers that is
//! also the idle time a kept-alive connection may sit ([`Limits::header_timeout`]), one for
//! its body, and a cap on request bodies held at once across all requests ([`Buffered`]:
//! beyond it a 503 with `Retry-After`). The cap leaves descriptors for the router's own
//! health polls, so clients cannot starve them.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// What one client may hold (defaults: `ray-launch route --help`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// 0: the descriptor limit less [`FD_RESERVE`].
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_buffered: usize,
}

/// Descriptors kept for the router's own use (health polls, connections to replicas).
pub const FD_RESERVE: usize = 512;

impl Limits {
    /// The connection cap in force: as set, or what the descriptor limit allows.
    pub fn connections(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(s, _)| s as usize);
        // half for clients: each client request may hold a connection to a replica too
        (soft.saturating_sub(FD_RESERVE) / 2).max(16)
    }
}

/// Request bodies held now, in bytes, against a cap; memory goes back to the system when a
/// burst is over.
pub struct Buffered {
    sem: Arc<Semaphore>,
    cap: usize,
    held: AtomicUsize,
    peak: AtomicUsize,
}

/// Bytes of one request's body, given back when dropped.
pub struct Hold {
    buffered: Arc<Buffered>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    bytes: usize,
}

impl Buffered {
    pub fn new(cap: usize) -> Arc<Buffered> {
        Arc::new(Buffered {
            sem: Arc::new(Semaphore::new(cap.min(Semaphore::MAX_PERMITS))),
            cap,
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A hold on nothing yet.
    pub fn hold(self: &Arc<Self>) -> Hold {
        Hold {
            buffered: self.clone(),
            permit: None,
            bytes: 0,
        }
    }
}

impl Hold {
    /// `n` more bytes; false when the cap is reached (the request gets a 503).
    pub fn add(&mut self, n: usize) -> bool {
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        let Ok(p) = self.buffered.sem.clone().try_acquire_many_owned(n32) else {
            return false;
        };
        match &mut self.permit {
            Some(have) => have.merge(p),
            None => self.permit = Some(p),
        }
        self.bytes += n;
        let now = self.buffered.held.fetch_add(n, Ordering::Relaxed) + n;
        self.buffered.peak.fetch_max(now, Ordering::Relaxed);
        true
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let b = &self.buffered;
        let left = b.held.fetch_sub(self.bytes, Ordering::Relaxed) - self.bytes;
        drop(self.permit.take());
        // a burst of large bodies is over: give the memory back to the system (glibc keeps
        // freed memory in its arenas otherwise)
        if left == 0 && b.peak.swap(0, Ordering::Relaxed) >= 16 << 20 {
            // SAFETY: malloc_trim only releases free memory of the allocator.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// Serve `app` on `listener` within `limits` until `stop`, then let the requests in flight
/// finish (the launcher SIGKILLs after its grace). `rejected` counts connections over the cap.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
    rejected: impl Fn() + Send + 'static,
) {
    let cap = limits.connections();
    let conns = Arc::new(Semaphore::new(cap));
    let (shut_tx, shut_rx) = watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    let mut backoff = Duration::from_millis(10);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    // out of descriptors, or the like: do not spin
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        backoff = Duration::from_millis(10);
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            // over the cap: this one is closed at once, the open ones are served
            rejected();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shut = shut_rx.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shut.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = shut_tx.send(true);
    let _ = conns.acquire_many(cap as u32).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_held_up_to_the_cap_and_given_back() {
        let b = Buffered::new(100);
        let mut one = b.hold();
        assert!(one.add(60));
        let mut two = b.hold();
        assert!(!two.add(50), "60 + 50 is over the cap");
        assert!(two.add(40));
        drop(one);
        let mut three = b.hold();
        assert!(three.add(60), "what the first held is back");
        assert!(!three.add(1));
        drop((two, three));
        assert_eq!(b.held.load(Ordering::Relaxed), 0);
    }
}
