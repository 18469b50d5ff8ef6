//! One request's attempts against the endpoint (retried by [`super::retry`]), the answer's
//! line in OpenAI's batch output format, and the replicas' queue gauges for `auto`.

use super::retry::{Outcome, Verdict};
use super::{input, Finished, Options};
use serde_json::value::RawValue;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What a request came to: an HTTP answer (2xx or final), or no answer at all.
#[derive(Debug)]
pub enum Answer {
    Http {
        status: u16,
        request_id: String,
        body: bytes::Bytes,
    },
    Transport(String),
}

impl Answer {
    /// No answer, or an answer worth another try (a 429, a 5xx from a stopping replica).
    pub fn retriable(&self) -> bool {
        match self {
            Answer::Transport(_) => true,
            Answer::Http { status, .. } => super::retry::retriable_status(*status),
        }
    }

    /// `usage.prompt_tokens` and `usage.completion_tokens` of an answer's body.
    pub fn usage(&self) -> Option<(u64, u64)> {
        #[derive(serde::Deserialize)]
        struct Usage {
            #[serde(default)]
            prompt_tokens: u64,
            #[serde(default)]
            completion_tokens: u64,
        }
        #[derive(serde::Deserialize)]
        struct Body {
            usage: Option<Usage>,
        }
        let Answer::Http { body, .. } = self else {
            return None;
        };
        let b: Body = serde_json::from_slice(body).ok()?;
        b.usage.map(|u| (u.prompt_tokens, u.completion_tokens))
    }
}

pub fn client(o: &Options) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(o.request_timeout)
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(4096)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// `http://h:p/v1` + `/v1/completions` → `http://h:p/v1/completions`.
pub fn join(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("{base}{path}")
}

async fn attempt(client: &reqwest::Client, o: &Options, r: &input::Request) -> (Answer, Outcome) {
    let mut req = client
        .post(join(&o.base_url, &r.url))
        .header("content-type", "application/json")
        .body(r.body.get().to_string());
    if let Some(k) = &o.api_key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => {
            let what = describe(&e);
            return (Answer::Transport(what.clone()), Outcome::Transport(what));
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(
            || format!("req_{}", &crate::auth::random_hex()[..24]),
            str::to_string,
        );
    match resp.bytes().await {
        Ok(body) => (
            Answer::Http {
                status,
                request_id,
                body,
            },
            Outcome::Answer {
                status,
                retry_after,
            },
        ),
        Err(e) => {
            let what = format!("the answer was cut off: {}", describe(&e));
            (Answer::Transport(what.clone()), Outcome::Transport(what))
        }
    }
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut msg = format!("the request {kind}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

/// Send `r` until it is done or failed for good; report it to the loop.
pub async fn request(
    client: reqwest::Client,
    o: Options,
    r: input::Request,
    done: mpsc::UnboundedSender<Finished>,
) {
    let mut n = 0;
    let result = loop {
        n += 1;
        let (answer, outcome) = attempt(&client, &o, &r).await;
        match o.retry.judge(n, &outcome, super::random_unit()) {
            Verdict::Done | Verdict::Final => break answer,
            Verdict::Retry(after) => {
                tracing::debug!(
                    "batch: {} attempt {n}: {outcome:?}; again in {after:?}",
                    r.custom_id
                );
                tokio::time::sleep(after).await;
            }
        }
    };
    let _ = done.send(Finished {
        custom_id: r.custom_id,
        model: r.model,
        attempts: n,
        result,
    });
}

/// The answer's line (OpenAI's batch output: `{id, custom_id, response, error}`), and
/// whether it goes to OUT (a 2xx) rather than OUT.errors.
pub fn answer_line(f: &Finished, job: &str, seq: u64) -> (Vec<u8>, bool) {
    let id = format!(
        "batch_req_{}{seq:x}_{}",
        if job.is_empty() {
            String::new()
        } else {
            format!("{job}_")
        },
        &crate::auth::random_hex()[..8]
    );
    let (response, error, ok) = match &f.result {
        Answer::Http {
            status,
            request_id,
            body,
        } => {
            let body_json: Box<RawValue> = std::str::from_utf8(body)
                .ok()
                .and_then(|t| RawValue::from_string(t.trim().to_string()).ok())
                .unwrap_or_else(|| {
                    RawValue::from_string(
                        serde_json::to_string(&String::from_utf8_lossy(body)).unwrap_or_default(),
                    )
                    .expect("a JSON string")
                });
            let ok = (200..300).contains(status);
            let error = (!ok).then(|| {
                serde_json::json!({
                    "code": format!("http_{status}"),
                    "message": engine_message(&body_json).unwrap_or_else(|| format!("the endpoint answered {status}")),
                })
            });
            (
                serde_json::json!({"status_code": status, "request_id": request_id, "body": body_json}),
                error,
                ok,
            )
        }
        Answer::Transport(what) => (
            serde_json::Value::Null,
            Some(
                serde_json::json!({"code": "no_answer", "message": format!("{what} (after {} attempts)", f.attempts)}),
            ),
            false,
        ),
    };
    let line = serde_json::json!({
        "id": id,
        "custom_id": f.custom_id,
        "response": response,
        "error": error,
    });
    let mut v = serde_json::to_vec(&line).expect("an answer serializes");
    v.push(b'\n');
    (v, ok)
}

/// The engine's own error message (`{"error": {"message": ...}}` or `{"message": ...}`).
fn engine_message(body: &RawValue) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body.get()).ok()?;
    v.pointer("/error/message")
        .or_else(|| v.get("message"))
        .or_else(|| v.get("detail"))
        .and_then(|m| m.as_str().map(str::to_string))
}

/// Poll each replica's `/metrics` every half second; the sum of their queue gauges (None
/// while no replica shows one).
pub fn watch_queues(
    client: &reqwest::Client,
    replicas: &[String],
    key: Option<String>,
) -> watch::Receiver<Option<u64>> {
    let (tx, rx) = watch::channel(None);
    let urls: Vec<String> = replicas.iter().map(|u| join(u, "/metrics")).collect();
    let client = client.clone();
    tokio::spawn(async move {
        loop {
            let mut sum: Option<u64> = None;
            for u in &urls {
                let mut req = client.get(u).timeout(Duration::from_secs(2));
                if let Some(k) = &key {
                    req = req.bearer_auth(k);
                }
                if let Ok(r) = req.send().await {
                    if let Ok(text) = r.text().await {
                        if let Some(w) = super::window::waiting_from_metrics(&text) {
                            *sum.get_or_insert(0) += w;
                        }
                    }
                }
            }
            if tx.send(sum).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(result: Answer) -> Finished {
        Finished {
            custom_id: "q-1".into(),
            model: "tiny".into(),
            attempts: 2,
            result,
        }
    }

    #[test]
    fn urls_join_under_the_base() {
        assert_eq!(
            join("http://h:1/v1", "/v1/completions"),
            "http://h:1/v1/completions"
        );
        assert_eq!(
            join("http://h:1/v1/", "/v1/chat/completions"),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            join("http://h:1/models/judge/v1", "/v1/completions"),
            "http://h:1/models/judge/v1/completions"
        );
    }

    #[test]
    fn answers_and_errors_in_the_batch_format() {
        let (line, ok) = answer_line(
            &finished(Answer::Http {
                status: 200,
                request_id: "r1".into(),
                body: bytes::Bytes::from_static(br#"{"choices":[{"text":"hi"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#),
            }),
            "42",
            7,
        );
        assert!(ok);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["custom_id"], "q-1");
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["request_id"], "r1");
        assert_eq!(v["response"]["body"]["choices"][0]["text"], "hi");
        assert!(v["error"].is_null());
        assert!(v["id"].as_str().unwrap().starts_with("batch_req_42_7_"));
        assert_eq!(line.last(), Some(&b'\n'));

        let (line, ok) = answer_line(
            &finished(Answer::Http {
                status: 400,
                request_id: "r2".into(),
                body: bytes::Bytes::from_static(
                    br#"{"error":{"message":"max_tokens is too large"}}"#,
                ),
            }),
            "",
            1,
        );
        assert!(!ok);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["error"]["code"], "http_400");
        assert_eq!(v["error"]["message"], "max_tokens is too large");
        assert_eq!(v["response"]["status_code"], 400);

        let (line, ok) = answer_line(
            &finished(Answer::Transport("could not connect".into())),
            "",
            2,
        );
        assert!(!ok);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "no_answer");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("after 2 attempts"));
    }
}
