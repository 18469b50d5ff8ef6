//! Master election and step detection, for every case in the Slurm notes.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use ray_launch::input::slurm::{detect, StepKind};
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| m.get(k).cloned()
}

/// A task of an srun step: nodes, this task's NODEID, tasks per node.
fn task(
    step_nodes: &str,
    nnodes: usize,
    node_id: usize,
    name: &str,
    tpn: &str,
) -> Vec<(String, String)> {
    vec![
        ("SLURM_JOB_ID".into(), "4242".into()),
        ("SLURM_STEP_ID".into(), "0".into()),
        ("SLURM_STEP_NODELIST".into(), step_nodes.into()),
        ("SLURM_JOB_NODELIST".into(), "node[1-12]".into()),
        ("SLURM_NNODES".into(), nnodes.to_string()),
        ("SLURM_NTASKS".into(), nnodes.to_string()),
        ("SLURM_NODEID".into(), node_id.to_string()),
        ("SLURM_PROCID".into(), node_id.to_string()),
        ("SLURMD_NODENAME".into(), name.into()),
        ("SLURM_STEP_TASKS_PER_NODE".into(), tpn.into()),
    ]
}

fn detect_vec(v: &[(String, String)]) -> ray_launch::error::Result<ray_launch::input::slurm::Step> {
    let pairs: Vec<(&str, &str)> = v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    detect(&env(&pairs), "localbox")
}

#[test]
fn master_is_first_node_of_the_step_not_of_the_job() {
    // `srun -r2 -N2` inside a 4-node job: the step is node[3-4], the job node[1-4]
    let s = detect_vec(&task("node[3-4]", 2, 1, "node4", "1(x2)")).unwrap();
    assert_eq!(s.kind, StepKind::Srun);
    assert_eq!(s.master(), "node3");
    assert_eq!(s.self_rank, Some(1));
    assert_eq!(s.nodes, ["node3", "node4"]);
}

#[test]
fn w_in_any_order_uses_slurms_sorted_step_list() {
    // `srun -w node04,node02`: Slurm numbers node02 as NODEID 0 and lists it first
    let s = detect_vec(&task("node[02,04]", 2, 0, "node02", "1(x2)")).unwrap();
    assert_eq!(s.master(), "node02");
    assert_eq!(s.self_rank, Some(0));
}

#[test]
fn natural_order_is_kept_never_resorted() {
    let s = detect_vec(&task("node[9-10]", 2, 1, "node10", "1(x2)")).unwrap();
    assert_eq!(s.master(), "node9");
    assert_eq!(s.nodes, ["node9", "node10"]);
}

#[test]
fn step_smaller_than_job() {
    let s = detect_vec(&task("node[5-7]", 3, 2, "node7", "1(x3)")).unwrap();
    assert_eq!(s.master(), "node5");
    assert_eq!(s.job_id, "4242");
}

#[test]
fn arbitrary_distribution_elects_nodeid_zero_not_procid_zero() {
    let mut v = task("node[1-2]", 2, 0, "node1", "1(x2)");
    v.retain(|(k, _)| k != "SLURM_PROCID");
    v.push(("SLURM_PROCID".into(), "1".into()));
    let s = detect_vec(&v).unwrap();
    assert_eq!(s.master(), "node1");
    assert_eq!(s.self_rank, Some(0));
}

#[test]
fn uneven_tasks_per_node_is_an_error_naming_the_fix() {
    let mut v = task("node[1-4]", 4, 0, "node1", "2(x3),1");
    v.retain(|(k, _)| k != "SLURM_NTASKS");
    v.push(("SLURM_NTASKS".into(), "7".into()));
    let e = detect_vec(&v).unwrap_err();
    assert!(e.msg.contains("2 tasks on node node1"), "{}", e.msg);
    assert!(e
        .hint
        .as_deref()
        .unwrap()
        .contains("srun --ntasks-per-node=1"));
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn two_tasks_per_node_same_error_on_every_rank() {
    let msgs: Vec<String> = (0..3)
        .map(|i| {
            let mut v = task("node[1-3]", 3, i, &format!("node{}", i + 1), "2(x3)");
            v.retain(|(k, _)| k != "SLURM_NTASKS");
            v.push(("SLURM_NTASKS".into(), "6".into()));
            detect_vec(&v).unwrap_err().report()
        })
        .collect();
    assert!(msgs[0].contains("exactly one task per node"));
    assert!(msgs.iter().all(|m| *m == msgs[0]), "{msgs:?}");
}

#[test]
fn ntasks_mismatch_without_tasks_per_node() {
    let mut v = task("node[1-2]", 2, 0, "node1", "1(x2)");
    v.retain(|(k, _)| k != "SLURM_NTASKS" && k != "SLURM_STEP_TASKS_PER_NODE");
    v.push(("SLURM_NTASKS".into(), "4".into()));
    let e = detect_vec(&v).unwrap_err();
    assert!(e.msg.contains("4 tasks on 2 nodes"), "{}", e.msg);
}

#[test]
fn batch_script_without_srun_is_an_error() {
    let e = detect(
        &env(&[
            ("SLURM_JOB_ID", "77"),
            ("SLURM_PROCID", "0"),
            ("SLURM_JOB_NODELIST", "node[1-3]"),
            ("SLURM_NODELIST", "node[1-3]"),
        ]),
        "node1",
    )
    .unwrap_err();
    assert!(e.msg.contains("not launched by srun"), "{}", e.msg);
    assert!(e.hint.unwrap().contains("srun --ntasks-per-node=1"));
}

#[test]
fn no_slurm_at_all_is_a_local_single_node_job() {
    let s = detect(&env(&[]), "mybox").unwrap();
    assert_eq!(s.kind, StepKind::Local);
    assert_eq!(s.nodes, ["mybox"]);
    assert_eq!(s.self_rank, Some(0));
}

#[test]
fn node_name_must_match_nodeid() {
    let e = detect_vec(&task("node[1-2]", 2, 0, "node2", "1(x2)")).unwrap_err();
    assert!(e.msg.contains("SLURMD_NODENAME=`node2`"), "{}", e.msg);
}

#[test]
fn gpus_from_slurm_then_cuda_visible_devices() {
    let mut v = task("node[1-2]", 2, 0, "node1", "1(x2)");
    v.push(("CUDA_VISIBLE_DEVICES".into(), "0,1,2,3".into()));
    assert_eq!(detect_vec(&v).unwrap().detected_gpus(), Some(4));
    v.push(("SLURM_GPUS_ON_NODE".into(), "8".into()));
    assert_eq!(detect_vec(&v).unwrap().detected_gpus(), Some(8));
    v.push(("SLURM_MEM_PER_NODE".into(), "64000".into()));
    v.push(("SLURM_CPUS_ON_NODE".into(), "32".into()));
    let s = detect_vec(&v).unwrap();
    assert_eq!(s.mem_per_node_mb, Some(64000));
    assert_eq!(s.cpus_on_node, Some(32));
}
