//! Which model a request is for: from its path (`/models/NAME/...`) or its body's `model`,
//! and the name the engine behind it knows. Pure: the router's [`Catalog`] in, a [`Route`] out.

/// What resolution needs of the router's models ("groups").
pub(super) trait Catalog {
    fn groups(&self) -> usize;
    /// The entry's name (`models[].name`, or an attached endpoint's).
    fn name(&self, g: usize) -> &str;
    /// Whether `model` names group `g` (its name, its served name, an attached server's id).
    fn answers_to(&self, g: usize, model: &str) -> bool;
    /// What the engine behind `g` calls its model.
    fn target(&self, g: usize) -> String;
    fn attached(&self, g: usize) -> bool;
}

/// What the path says, before the body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Scope {
    /// The model the path names (`/models/NAME/...`).
    pub(super) group: Option<usize>,
    /// The path (and query) to send on: `/models/NAME` taken off.
    pub(super) pq: String,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    /// To a replica of `group` (none: of any), with the body's `model` set to `rewrite`.
    To {
        group: Option<usize>,
        rewrite: Option<String>,
    },
    /// `GET /v1/models`, answered by the router: these groups.
    List(Vec<usize>),
    /// The request names no model this router serves.
    Unknown(String),
    /// A request the router will not pass on (a 400): why.
    Bad(String),
}

/// Why the path is not passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PathError {
    /// `/models/NAME/...` names no model this router serves.
    Unknown(String),
    /// Dot segments (encoded or not), or a model's path that leaves its `/v1/`.
    Bad(String),
}

/// `%XX` decoded (what a server may decode the path to); invalid escapes kept as they are.
fn percent_decoded(path: &str) -> String {
    let b = path.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a path, as it is or decoded (twice: a double encoding too), has a `.` or `..`
/// segment, or a backslash a server might take for a slash.
fn escapes(path: &str) -> bool {
    let once = percent_decoded(path);
    let twice = percent_decoded(&once);
    [path, once.as_str(), twice.as_str()]
        .iter()
        .any(|p| p.contains('\\') || p.split('/').any(|seg| seg == "." || seg == ".."))
}

/// The path's part: `/models/NAME/rest` → NAME's group and `/rest`; an unknown NAME → `Err`.
/// Without routing by name the path is left as it is.
pub(super) fn scope(cat: &dyn Catalog, by_name: bool, pq: &str) -> Result<Scope, PathError> {
    let path = pq.split('?').next().unwrap_or_default();
    if escapes(path) {
        return Err(PathError::Bad(
            "the path has `.` or `..` segments (encoded or not): give the endpoint's own path"
                .into(),
        ));
    }
    let plain = Scope {
        group: None,
        pq: pq.to_string(),
    };
    let Some(rest) = pq.strip_prefix("/models/").filter(|_| by_name) else {
        return Ok(plain);
    };
    let (name, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some(g) = (0..cat.groups()).find(|&g| cat.name(g) == name) else {
        return Err(PathError::Unknown(name.to_string()));
    };
    let tail_path = tail.split('?').next().unwrap_or_default();
    if !tail.is_empty() && tail_path != "/v1" && !tail_path.starts_with("/v1/") {
        return Err(PathError::Bad(format!(
            "`/models/{name}` serves the OpenAI API under `/models/{name}/v1/` only"
        )));
    }
    Ok(Scope {
        group: Some(g),
        pq: if tail.is_empty() {
            "/".into()
        } else {
            tail.to_string()
        },
    })
}

/// The model a request asks for, from its body (`{"model": ...}`), if it names one. An empty
/// body names none; `Err`: a body that is not a JSON object, or a `model` that is no string.
pub(super) fn requested_model(body: &[u8]) -> Result<Option<String>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => match m.get("model") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err("`model` must be a string".into()),
        },
        Ok(_) => Err("the request body must be a JSON object".into()),
        Err(e) => Err(format!("the request body is not JSON ({e})")),
    }
}

/// Where a request with this scope, method and body goes.
pub(super) fn resolve(
    cat: &dyn Catalog,
    by_name: bool,
    scope: &Scope,
    get: bool,
    body: &[u8],
) -> Route {
    if !by_name {
        return Route::To {
            group: None,
            rewrite: None,
        };
    }
    let path = scope.pq.split('?').next().unwrap_or_default();
    if get && path == "/v1/models" {
        return Route::List(match scope.group {
            Some(g) => vec![g],
            None => (0..cat.groups()).collect(),
        });
    }
    let asked = match requested_model(body) {
        Ok(m) => m,
        Err(why) => return Route::Bad(why),
    };
    let g = match (scope.group, asked.as_deref()) {
        (Some(g), _) => g,
        (None, Some(m)) => match (0..cat.groups()).find(|&g| cat.answers_to(g, m)) {
            Some(g) => g,
            None => return Route::Unknown(m.to_string()),
        },
        // no model named: the first one, as an engine serves its first name
        (None, None) => 0,
    };
    // the engine knows its model by its served name only
    let rewrite = asked.and_then(|m| {
        let target = cat.target(g);
        let theirs = cat.attached(g) && cat.answers_to(g, &m) && m != cat.name(g);
        let by_path = scope.group.is_some();
        (m != target && !theirs && (by_path || m == cat.name(g))).then_some(target)
    });
    Route::To {
        group: Some(g),
        rewrite,
    }
}

/// The body with its `model` field set to `to`.
pub(super) fn with_model(body: &bytes::Bytes, to: &str) -> bytes::Bytes {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("model".into(), serde_json::Value::String(to.into()));
            serde_json::to_vec(&m)
                .map(bytes::Bytes::from)
                .unwrap_or_else(|_| body.clone())
        }
        _ => body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// policy (served as `org/policy-7b`), judge (attached, lists `judge-8b`).
    struct Two;
    impl Catalog for Two {
        fn groups(&self) -> usize {
            2
        }
        fn name(&self, g: usize) -> &str {
            ["policy", "judge"][g]
        }
        fn answers_to(&self, g: usize, m: &str) -> bool {
            match g {
                0 => m == "policy" || m == "org/policy-7b",
                _ => m == "judge" || m == "judge-8b",
            }
        }
        fn target(&self, g: usize) -> String {
            ["org/policy-7b", "judge-8b"][g].into()
        }
        fn attached(&self, g: usize) -> bool {
            g == 1
        }
    }

    fn route(pq: &str, get: bool, body: &str) -> Result<Route, PathError> {
        let s = scope(&Two, true, pq)?;
        Ok(resolve(&Two, true, &s, get, body.as_bytes()))
    }

    fn to(group: usize, rewrite: Option<&str>) -> Result<Route, PathError> {
        Ok(Route::To {
            group: Some(group),
            rewrite: rewrite.map(str::to_string),
        })
    }

    #[test]
    fn by_the_body_the_entry_name_is_rewritten_to_the_served_one() {
        let p = "/v1/completions";
        assert_eq!(
            route(p, false, r#"{"model":"policy"}"#),
            to(0, Some("org/policy-7b"))
        );
        assert_eq!(route(p, false, r#"{"model":"org/policy-7b"}"#), to(0, None));
        // an attached server's own id goes as it is
        assert_eq!(route(p, false, r#"{"model":"judge-8b"}"#), to(1, None));
        assert_eq!(
            route(p, false, r#"{"model":"judge"}"#),
            to(1, Some("judge-8b"))
        );
    }

    #[test]
    fn by_the_path_whatever_the_body_says() {
        let s = scope(&Two, true, "/models/judge/v1/chat/completions?x=1").unwrap();
        assert_eq!(s.pq, "/v1/chat/completions?x=1");
        assert_eq!(
            resolve(&Two, true, &s, false, br#"{"model":"policy"}"#),
            Route::To {
                group: Some(1),
                rewrite: Some("judge-8b".into())
            }
        );
        assert_eq!(scope(&Two, true, "/models/judge").unwrap().pq, "/");
        assert_eq!(
            route("/models/judge/v1/models", true, ""),
            Ok(Route::List(vec![1]))
        );
        assert_eq!(route("/v1/models", true, ""), Ok(Route::List(vec![0, 1])));
    }

    #[test]
    fn unknown_missing_and_malformed() {
        assert_eq!(
            scope(&Two, true, "/models/nope/v1/x"),
            Err(PathError::Unknown("nope".into()))
        );
        assert_eq!(
            route("/v1/completions", false, r#"{"model":"nope"}"#),
            Ok(Route::Unknown("nope".into()))
        );
        // no model: the first model, as an engine serves its first name
        assert_eq!(
            route("/v1/completions", false, r#"{"prompt":"x"}"#),
            to(0, None)
        );
        assert_eq!(route("/v1/completions", false, ""), to(0, None));
        // a body that is not a JSON object, a model that is no string: refused (400)
        for body in [
            "not json",
            "[1,2]",
            r#"{"model": 7}"#,
            r#"{"model": ["judge"]}"#,
        ] {
            assert!(
                matches!(route("/v1/completions", false, body), Ok(Route::Bad(_))),
                "{body}"
            );
        }
        // one model, no names: nothing to resolve
        let s = scope(&Two, false, "/models/judge/v1/x").unwrap();
        assert_eq!(s.pq, "/models/judge/v1/x");
        assert_eq!(
            resolve(&Two, false, &s, false, b"{}"),
            Route::To {
                group: None,
                rewrite: None
            }
        );
    }

    #[test]
    fn paths_stay_under_the_models_v1_and_have_no_dot_segments() {
        let bad = |pq: &str| matches!(scope(&Two, true, pq), Err(PathError::Bad(_)));
        for pq in [
            "/models/judge/../../admin",
            "/models/judge/v1/../../admin",
            "/models/judge/%2e%2e/%2E%2E/admin",
            "/models/judge/v1/..%2f..%2fadmin",
            "/models/judge/v1/%252e%252e/admin",
            "/models/judge/admin",
            "/models/judge/v1x",
            "/v1/./completions",
            "/v1/..\\admin",
        ] {
            assert!(bad(pq), "{pq}");
        }
        for pq in [
            "/models/judge/v1/models",
            "/models/judge/v1",
            "/models/judge",
            "/v1/completions?a=..%2f",
        ] {
            assert!(scope(&Two, true, pq).is_ok(), "{pq}");
        }
    }
}
