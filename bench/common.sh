# Shared by bench/startup.sh and bench/soak.sh (sourced): the bed up and the release build,
# the job they run, and how they look at the nodes.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SLURM_CONF=/etc/slurm/slurm.conf
for v in $(compgen -e | grep -E '^SLURM_' | grep -v SLURM_CONF || true); do unset "$v"; done
bash "$ROOT/slurm/testbed/up.sh" >/dev/null
(cd "$ROOT" && cargo build -q --release)
RL=$ROOT/target/release/ray-launch
RAY=$ROOT/.venv/bin/ray

# the job: ray backend across the 3 nodes, stand-in engine, default settings otherwise
write_job_yaml() {
  cat > "$1" <<EOS
engine: vllm
model: tiny
parallel: {tensor: 3}
gpus_per_node: 1
vllm: {executable: $ROOT/tests/standin/vllm}
ray: {executable: $RAY, object_store_memory: 200MiB}
env: {STANDIN_EXPECT_NODES: 3}
EOS
}
ms() { echo $(( $(date +%s%N) / 1000000 )); }
# processes on the nodes that are not the bed's own
leftovers() { for i in 1 2 3; do for p in $(ip netns pids sl-n$i); do case $(cat /proc/$p/comm 2>/dev/null) in unshare|tini|slurmd|slurmstepd|"") ;; *) echo "$p";; esac; done; done; }
# the first process on node $1 named $2 (waits up to 5 s for it)
pid_on() { for _ in $(seq 100); do for q in $(ip netns pids sl-n$1); do [ "$(cat /proc/$q/comm 2>/dev/null)" = "$2" ] && { echo "$q"; return; }; done; sleep 0.05; done; }
# until the job in dir $1 logged `ready` (at most 60 s); else say so with its output, return 1
wait_ready() { for _ in $(seq 2400); do grep -q '"event":"ready"' "$1/ev.jsonl" 2>/dev/null && return 0; sleep 0.025; done
  echo "not ready: $1" >&2; cat "$1/batch.out" >&2 2>/dev/null; return 1; }
