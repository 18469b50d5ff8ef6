//! The launcher's own rank-to-rank channel: newline-delimited JSON over TCP to the master.
//!
//! Handshake: the master speaks first with `Challenge { nonce }`; the rank answers `Hello`
//! with `proof` (none today; an HMAC of the nonce with a per-job secret later, without
//! changing the message flow). The master answers `Welcome` once every rank has said hello
//! (or `Stop` on a mismatch), then drives the start with `Start { name }`.
//! Every message is one line of at most [`MAX_LINE`] bytes.

use crate::plan::NodeInfo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// A Welcome for a thousand nodes is ~150 KB; anything much larger is not ours.
pub const MAX_LINE: u64 = 16 << 20;
pub const PROTOCOL: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    Hello {
        protocol: u32,
        node: String,
        node_rank: usize,
        version: String,
        digest: String,
        info: NodeInfo,
        proof: Option<String>,
    },
    /// A command reached its ready point (`ray-head`/`ray-worker`: "Ray runtime started";
    /// `engine` on a leader: `/health` 200, on followers: started).
    Up {
        name: String,
    },
    /// A command this rank runs ended (unexpectedly unless we are stopping).
    Exited {
        name: String,
        status: String,
        code: i32,
        log: Option<String>,
        tail: Vec<String>,
    },
    /// Something else went wrong here: spawn failure, health failures.
    Failed {
        code: i32,
        reason: String,
    },
    /// This rank got a signal and is stopping.
    Stopping {
        signal: i32,
    },
    /// Teardown on this rank is complete.
    Stopped,
    Heartbeat,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToRank {
    Challenge {
        protocol: u32,
        nonce: String,
    },
    /// Every rank's facts in node-rank order: with them each rank builds the same plan.
    Welcome {
        nodes: Vec<NodeInfo>,
    },
    Start {
        name: String,
    },
    /// Stop everything and exit with `code`; `node` caused it (if a node did).
    Stop {
        code: i32,
        reason: String,
        node: Option<String>,
    },
    Heartbeat,
}

#[derive(Debug)]
pub enum RecvError {
    Closed,
    TooLong,
    Bad(String),
    Io(std::io::Error),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Closed => f.write_str("connection closed"),
            RecvError::TooLong => write!(f, "message longer than {MAX_LINE} bytes"),
            RecvError::Bad(e) => write!(f, "unreadable message: {e}"),
            RecvError::Io(e) => write!(f, "{e}"),
        }
    }
}

pub struct Reader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(r: R) -> Self {
        Reader {
            inner: BufReader::new(r),
            buf: Vec::new(),
        }
    }

    pub async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, RecvError> {
        self.buf.clear();
        let n = (&mut self.inner)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.buf)
            .await
            .map_err(RecvError::Io)?;
        if n == 0 {
            return Err(RecvError::Closed);
        }
        if self.buf.last() != Some(&b'\n') {
            return Err(if n as u64 >= MAX_LINE {
                RecvError::TooLong
            } else {
                RecvError::Closed
            });
        }
        serde_json::from_slice(&self.buf).map_err(|e| RecvError::Bad(e.to_string()))
    }
}

pub async fn send<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).expect("messages serialize");
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            address: "10.0.0.1".into(),
            interface: Some("eth0".into()),
            cpus: 4,
            object_store_bytes: 1 << 30,
        }
    }

    #[tokio::test]
    async fn messages_round_trip_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, _bw) = tokio::io::split(b);
        let mut r = Reader::new(br);
        let msgs = vec![
            ToMaster::Hello {
                protocol: PROTOCOL,
                node: "n1".into(),
                node_rank: 0,
                version: "0.1.0".into(),
                digest: "ab".into(),
                info: info(),
                proof: None,
            },
            ToMaster::Up {
                name: "ray-head".into(),
            },
            ToMaster::Exited {
                name: "engine".into(),
                status: "signal 9 (SIGKILL)".into(),
                code: 137,
                log: None,
                tail: vec!["x".into()],
            },
            ToMaster::Heartbeat,
        ];
        for m in &msgs {
            send(&mut aw, m).await.unwrap();
        }
        drop(aw);
        drop(ar);
        for m in &msgs {
            assert_eq!(&r.recv::<ToMaster>().await.unwrap(), m);
        }
        assert!(matches!(r.recv::<ToMaster>().await, Err(RecvError::Closed)));
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_ar, mut aw) = tokio::io::split(a);
        let (br, _bw) = tokio::io::split(b);
        let mut r = Reader::new(br);
        aw.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(r.recv::<ToMaster>().await, Err(RecvError::Bad(_))));
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let s = serde_json::to_string(&ToRank::Start {
            name: "engine".into(),
        })
        .unwrap();
        assert_eq!(s, r#"{"type":"start","name":"engine"}"#);
    }
}
