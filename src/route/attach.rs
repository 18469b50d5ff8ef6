//! Attached endpoints (`attach:`): servers the job does not run. Before anything starts the
//! master checks that each answers `GET /v1/models` ([`check_all`]); the router then polls the
//! same URL as their health check and learns the model ids they serve ([`probe`]).

use serde::Serialize;
use std::time::Duration;

/// An endpoint that already runs (`attach:`): behind the router, never started or stopped.
/// The plan carries one per entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttachSpec {
    pub name: String,
    pub url: String,
    pub api_key_file: Option<String>,
    /// The router's URL for it alone.
    pub router_url: String,
}

/// The most of a `/v1/models` answer that is read (a list of model ids is small).
pub const MAX_ANSWER: usize = 1 << 20;

/// `http://h:p/v1` → `http://h:p`: what the router puts request paths (`/v1/...`) after.
pub fn base_of(url: &str) -> String {
    let u = url.trim_end_matches('/');
    u.strip_suffix("/v1").unwrap_or(u).to_string()
}

/// The model ids in a `/v1/models` answer (`{"data": [{"id": ...}, ...]}`).
pub fn parse_models(body: &[u8]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Model {
        id: String,
    }
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Model>,
    }
    let list: List = serde_json::from_slice(body).map_err(|e| {
        let shown: String = String::from_utf8_lossy(body).chars().take(120).collect();
        format!("answered 200 with no model list ({e}): {shown}")
    })?;
    if list.data.is_empty() {
        return Err("answered an empty model list".into());
    }
    Ok(list.data.into_iter().map(|m| m.id).collect())
}

/// `GET BASE/v1/models` with the endpoint's key: the ids it serves, or what went wrong.
pub async fn probe(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    within: Duration,
) -> Result<Vec<String>, String> {
    let mut rb = client.get(format!("{base}/v1/models")).timeout(within);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let mut resp = rb.send().await.map_err(|e| {
        if e.is_timeout() {
            format!(
                "did not answer within {}",
                humantime::format_duration(within)
            )
        } else {
            // reqwest's Display hides the cause (`Connection refused`) at the end of its
            // source chain: say that one
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = s.to_string();
                src = s.source();
            }
            format!("failed: {why}")
        }
    })?;
    let status = resp.status();
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(within, resp.chunk()).await {
            Ok(Ok(Some(c))) => {
                if body.len() + c.len() > MAX_ANSWER {
                    return Err(format!("answered more than {MAX_ANSWER} bytes"));
                }
                body.extend_from_slice(&c);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err(format!("broke off its answer: {e}")),
            Err(_) => return Err("did not finish its answer in time".into()),
        }
    }
    if !status.is_success() {
        let shown: String = String::from_utf8_lossy(&body)
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return Err(format!("answered {status}: {shown}"));
    }
    parse_models(&body)
}

/// A client that goes straight to the endpoint (no proxy: it is on the cluster's network).
pub fn client(connect_within: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(connect_within)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Every attached endpoint answers within `within`: their model ids, or the first failure
/// named by its entry and URL.
pub async fn check_all(
    all: &[AttachSpec],
    within: Duration,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let client = client(within)?;
    let checks = all.iter().map(|a| {
        let client = client.clone();
        async move {
            let key = match &a.api_key_file {
                Some(f) => Some(
                    crate::auth::read_key_file(std::path::Path::new(f))
                        .map_err(|e| format!("attach `{}`: api_key_file: {e}", a.name))?,
                ),
                None => None,
            };
            let base = base_of(&a.url);
            probe(&client, &base, key.as_deref(), within)
                .await
                .map(|ids| (a.name.clone(), ids))
                .map_err(|why| {
                    format!(
                        "attach `{}`: GET {base}/v1/models {why} (timeouts.attach {}); check that the server runs and the URL and key are right, or remove it from `attach:`",
                        a.name,
                        humantime::format_duration(within)
                    )
                })
        }
    });
    futures_util::future::join_all(checks)
        .await
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(url: String) -> AttachSpec {
        AttachSpec {
            name: "j".into(),
            url,
            api_key_file: None,
            router_url: String::new(),
        }
    }

    #[test]
    fn a_server_that_takes_the_connection_and_never_answers_times_out() {
        // the kernel completes the handshake; nobody ever reads or answers
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t0 = std::time::Instant::now();
        let e = rt
            .block_on(check_all(&[plan(url.clone())], Duration::from_millis(300)))
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(
            e.starts_with(&format!(
                "attach `j`: GET {}/models did not answer within 300ms",
                url
            )),
            "{e}"
        );
        drop(l);
        let e = rt
            .block_on(check_all(&[plan(url.clone())], Duration::from_millis(300)))
            .unwrap_err();
        assert!(e.contains("/models failed: Connection refused"), "{e}");
    }

    #[test]
    fn model_lists() {
        assert_eq!(
            parse_models(br#"{"object":"list","data":[{"id":"a","object":"model"},{"id":"b"}]}"#),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert!(parse_models(b"<html>hi</html>")
            .unwrap_err()
            .contains("no model list"));
        assert!(parse_models(br#"{"data":[]}"#)
            .unwrap_err()
            .contains("empty"));
        assert_eq!(base_of("http://h:1/v1"), "http://h:1");
        assert_eq!(base_of("http://h:1/openai/v1/"), "http://h:1/openai");
    }
}
