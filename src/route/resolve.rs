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
}

/// The path's part: `/models/NAME/rest` → NAME's group and `/rest`; an unknown NAME → `Err`.
/// Without routing by name the path is left as it is.
pub(super) fn scope(cat: &dyn Catalog, by_name: bool, pq: &str) -> Result<Scope, String> {
    let plain = Scope {
        group: None,
        pq: pq.to_string(),
    };
    let Some(rest) = pq.strip_prefix("/models/").filter(|_| by_name) else {
        return Ok(plain);
    };
    let (name, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some(g) = (0..cat.groups()).find(|&g| cat.name(g) == name) else {
        return Err(name.to_string());
    };
    Ok(Scope {
        group: Some(g),
        pq: if tail.is_empty() {
            "/".into()
        } else {
            tail.to_string()
        },
    })
}

/// The model a request asks for, from its body (`{"model": ...}`), if it names one.
pub(super) fn requested_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        model: Option<String>,
    }
    serde_json::from_slice::<M>(body).ok().and_then(|m| m.model)
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
    let asked = requested_model(body);
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

    fn route(pq: &str, get: bool, body: &str) -> Result<Route, String> {
        let s = scope(&Two, true, pq)?;
        Ok(resolve(&Two, true, &s, get, body.as_bytes()))
    }

    fn to(group: usize, rewrite: Option<&str>) -> Result<Route, String> {
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
        assert_eq!(scope(&Two, true, "/models/nope/v1/x"), Err("nope".into()));
        assert_eq!(
            route("/v1/completions", false, r#"{"model":"nope"}"#),
            Ok(Route::Unknown("nope".into()))
        );
        // no model, or a body that is not JSON: the first model, as an engine serves its first name
        assert_eq!(
            route("/v1/completions", false, r#"{"prompt":"x"}"#),
            to(0, None)
        );
        assert_eq!(route("/v1/completions", false, "not json"), to(0, None));
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
}
