//! Which installed versions a plan needs, pure: the programs to ask (`ray --version`, ...)
//! and the oldest version that runs what the plan asks of them. `ray-launch check` runs them.

use super::Plan;
use crate::input::config::{Engine, VllmBackend};
use crate::input::settings::Settings;

pub type Version = (u32, u32, u32);

/// One program to ask for its version, and what the plan needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// `Ray`, `vLLM`, `SGLang`.
    pub what: &'static str,
    pub argv: Vec<String>,
    /// The oldest version that runs the plan, and why; `None`: any (only reported).
    pub min: Option<(Version, &'static str)>,
}

/// The first `X.Y.Z` (or `X.Y`) in `text`: `ray, version 2.60.0` → (2, 60, 0).
pub fn parse(text: &str) -> Option<Version> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|w| w.contains('.'))
        .find_map(|w| {
            let mut it = w.split('.').map(|p| p.parse::<u32>().ok());
            let (a, b) = (it.next()??, it.next()??);
            let c = it.next().flatten().unwrap_or(0);
            Some((a, b, c))
        })
}

pub fn show(v: Version) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// What the plan needs: Ray when a model runs on it (2.52 for token auth), vLLM (0.11.0 for
/// its own multi-node backend, `--nnodes`, and the data-parallel ranks it derives from it),
/// SGLang (reported).
pub fn needs(plan: &Plan, s: &Settings) -> Vec<Need> {
    let c = &s.config;
    let mut out = Vec::new();
    if plan.uses_ray() {
        out.push(Need {
            what: "Ray",
            argv: vec![c.ray.executable.clone(), "--version".into()],
            min: s
                .auth
                .then_some(((2, 52, 0), "token authentication (RAY_AUTH_MODE=token)")),
        });
    }
    let vllm: Vec<_> = plan
        .models
        .iter()
        .filter(|m| m.engine == Engine::Vllm)
        .collect();
    if !vllm.is_empty() {
        let multi = vllm
            .iter()
            .any(|m| m.backend == Some(VllmBackend::Mp) && (m.nodes_per_replica > 1))
            || s.models
                .iter()
                .any(|m| m.engine == Engine::Vllm && m.parallel.data > 1);
        out.push(Need {
            what: "vLLM",
            argv: vec![c.vllm.executable.clone(), "--version".into()],
            min: multi.then_some((
                (0, 11, 0),
                "its own multi-node backend (--nnodes/--node-rank/--headless) and data parallelism over it",
            )),
        });
    }
    if plan.models.iter().any(|m| m.engine == Engine::Sglang) {
        out.push(Need {
            what: "SGLang",
            argv: vec![
                c.sglang.python.clone(),
                "-c".into(),
                "import sglang; print(sglang.__version__)".into(),
            ],
            min: None,
        });
    }
    out
}

/// What `check` says of one answer: `Ok(line)` or `Err(message)` when too old.
pub fn judge(n: &Need, answer: Option<&str>) -> Result<String, String> {
    let Some(v) = answer.and_then(parse) else {
        return Ok(format!(
            "{}: `{}` did not say its version (not installed here?)",
            n.what,
            n.argv.join(" ")
        ));
    };
    match n.min {
        Some((min, why)) if v < min => Err(format!(
            "{} {} is too old for this config: {why} needs {} or newer",
            n.what,
            show(v),
            show(min)
        )),
        Some((min, _)) => Ok(format!(
            "{} {} (needs {} or newer)",
            n.what,
            show(v),
            show(min)
        )),
        None => Ok(format!("{} {}", n.what, show(v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_and_judged() {
        assert_eq!(parse("ray, version 2.60.0\n"), Some((2, 60, 0)));
        assert_eq!(parse("0.32.0+cpu"), Some((0, 32, 0)));
        assert_eq!(parse("INFO 12-02 loaded\n0.11.2\n"), Some((0, 11, 2)));
        assert_eq!(parse("no version"), None);
        let n = Need {
            what: "vLLM",
            argv: vec!["vllm".into(), "--version".into()],
            min: Some(((0, 11, 0), "its own multi-node backend")),
        };
        assert_eq!(
            judge(&n, Some("0.10.2")).unwrap_err(),
            "vLLM 0.10.2 is too old for this config: its own multi-node backend needs 0.11.0 or newer"
        );
        assert_eq!(
            judge(&n, Some("0.32.0")).unwrap(),
            "vLLM 0.32.0 (needs 0.11.0 or newer)"
        );
        assert!(judge(&n, None).unwrap().contains("did not say its version"));
    }
}
