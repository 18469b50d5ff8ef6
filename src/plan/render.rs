//! The plan as text (`ray-launch plan`): the layout, each model and replica, the ports,
//! and the commands of the ranks asked for. Reads a [`Plan`]; decides nothing.

use super::*;
use std::fmt::Write as _;

/// Human-readable form. With many ranks, commands are shown for `show` ranks only.
pub fn render_text(p: &Plan, show: &[usize]) -> String {
    let mut o = header(p);
    if let Some(from) = &p.gpus_from {
        let _ = writeln!(o, "GPUs per node: {} (from {from})", p.gpus_per_node);
    }
    let several = p.models.len() > 1 || !p.attached.is_empty();
    for w in &p.warnings {
        let _ = writeln!(o, "warning: {w}");
    }
    let _ = writeln!(
        o,
        "master: {} ({}), launcher channel port {}",
        p.master.node, p.master.address, p.channel.port
    );
    match &p.self_rank {
        Some(s) => {
            let _ = writeln!(o, "this task: {} (node rank {})", s.node, s.node_rank);
        }
        None => {
            let _ = writeln!(o, "this task: not part of the step (preview)");
        }
    }
    if let Some(r) = &p.router {
        let _ = writeln!(
            o,
            "endpoint: {} (router on {}, over every replica)",
            r.url, r.node
        );
    }
    for e in &p.endpoints {
        let gpus = e
            .gpus
            .as_ref()
            .map(|g| format!(" on {}, GPUs {g}", e.node))
            .unwrap_or_default();
        if several {
            let _ = writeln!(o, "replica {} of {}{gpus}: {}", e.replica, e.model, e.url);
        } else if p.router.is_some() {
            let _ = writeln!(
                o,
                "replica {} (behind the router){gpus}: {}",
                e.replica, e.url
            );
        } else {
            let _ = writeln!(o, "endpoint (replica {}): {}", e.replica, e.url);
        }
    }
    let _ = writeln!(
        o,
        "\n{:<5} {:<20} {:<16} {:<16} {:<7}",
        "rank", "node", "address", "role", "replica"
    );
    for r in &p.ranks {
        let _ = writeln!(
            o,
            "{:<5} {:<20} {:<16} {:<16} {:<7}",
            r.node_rank,
            r.node,
            r.address,
            r.role.as_str(),
            r.replica
        );
    }
    for &i in show {
        let Some(r) = p.ranks.get(i) else { continue };
        let _ = writeln!(
            o,
            "\n# rank {} on {} ({}), temp dir {}",
            r.node_rank,
            r.node,
            r.role.as_str(),
            r.temp_dir
        );
        for c in &r.commands {
            let _ = writeln!(o, "[{}] {}", c.kind, c.shell());
        }
    }
    if show.len() < p.ranks.len() {
        let _ = writeln!(
            o,
            "\n({} of {} ranks shown; `--rank N` shows another, `--format json` shows all)",
            show.len(),
            p.ranks.len()
        );
    }
    o
}

/// What the job runs: engine, backend, layout, and one line per model when it has several.
fn header(p: &Plan) -> String {
    let mut o = String::new();
    let backend = p
        .backend
        .map(|b| {
            format!(
                " ({} backend)",
                match b {
                    VllmBackend::Ray => "ray",
                    VllmBackend::Mp => "mp",
                }
            )
        })
        .unwrap_or_default();
    let engine = match p.engine {
        Engine::Vllm => "vllm",
        Engine::Sglang => "sglang",
    };
    let several = p.models.len() > 1 || !p.attached.is_empty();
    if several {
        let _ = writeln!(
            o,
            "job {}: {} model(s) on {} node(s), {} GPU(s) per node",
            p.job_id,
            p.models.len(),
            p.nodes,
            p.gpus_per_node
        );
        for m in &p.models {
            let engine = match (m.engine, m.backend) {
                (Engine::Sglang, _) => "sglang",
                (Engine::Vllm, Some(VllmBackend::Ray)) => "vllm (ray backend)",
                (Engine::Vllm, _) => "vllm (mp backend)",
            };
            let nodes: Vec<&str> = p.ranks[m.first_node..m.first_node + m.nodes]
                .iter()
                .map(|r| r.node.as_str())
                .collect();
            let shape = if m.replicas_per_node > 1 {
                format!("{} per node, side by side", m.replicas_per_node)
            } else {
                format!("of {} node(s)", m.nodes_per_replica)
            };
            let _ = writeln!(
                o,
                "model {}: {engine} serving {} as `{}` on {} ({}), {} replica(s) {shape}{}; {}",
                m.name,
                m.model,
                m.served_model_name,
                nodes.join(","),
                if m.nodes == 1 {
                    "1 node".to_string()
                } else {
                    format!("{} nodes", m.nodes)
                },
                m.replicas,
                if m.required { "" } else { ", not required" },
                m.url
            );
        }
        for a in &p.attached {
            let _ = writeln!(
                o,
                "attached {}: {} (checked before the start); {}",
                a.name, a.url, a.router_url
            );
        }
    } else {
        let _ = writeln!(o, "job {}: {engine}{backend} serving {}", p.job_id, p.model);
        if p.replicas_per_node > 1 {
            let _ = writeln!(
                o,
                "{} node(s), {} replica(s): {} per node, side by side, {} GPU(s) per node",
                p.nodes, p.replicas, p.replicas_per_node, p.gpus_per_node
            );
        } else {
            let _ = writeln!(
                o,
                "{} node(s), {} replica(s) of {} node(s), {} GPU(s) per node",
                p.nodes, p.replicas, p.nodes_per_replica, p.gpus_per_node
            );
        }
    }
    o
}
