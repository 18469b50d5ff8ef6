#!/usr/bin/env bash
# Benchmark on the local Slurm bed (scripts/test.sh's setup must have run; brings the bed up).
# Side by side, ROUNDS times each, medians and ratios:
#   A. baseline: plain `ray start` on 3 nodes, the ideal shell script (head, then workers the
#      moment the head's "Ray runtime started" appears; no sleeps): srun -> all 3 joined;
#   B. ray-launch (ray backend, stand-in engine): srun -> all 3 joined, -> ready;
#   C. kill -9 of a worker's raylet -> the step has ended on every node;
#   D. scancel -> no process of the job left on any node.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-3}
export SLURM_CONF=/etc/slurm/slurm.conf
for v in $(compgen -e | grep -E '^SLURM_' | grep -v SLURM_CONF || true); do unset "$v"; done
bash "$ROOT/slurm/testbed/up.sh" >/dev/null
W=$(mktemp -d /tmp/rl-bench.XXXXXX); chmod 755 "$W"; cd "$W"
trap 'scancel -n rlbench 2>/dev/null; rm -rf "$W"' EXIT
ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
leftovers() { for i in 1 2 3; do for p in $(ip netns pids sl-n$i); do case $(cat /proc/$p/comm 2>/dev/null) in unshare|tini|slurmd|slurmstepd|"") ;; *) echo $p;; esac; done; done; }
RAY=$ROOT/.venv/bin/ray

cat > plain.sh <<EOS
#!/bin/bash
# the ideal hand-written launcher: no fixed sleeps
d=\$1; ip=\$(ip -4 -o addr show eth0 | awk '{print \$4}' | cut -d/ -f1)
common="--block --node-ip-address=\$ip --num-cpus=1 --num-gpus=0 --object-store-memory=200000000 --temp-dir=/tmp/rlb-\$SLURM_NODEID --disable-usage-stats"
if [ "\$SLURM_NODEID" = 0 ]; then
  setsid $RAY start --head --port=29379 --include-dashboard=false \$common </dev/null >\$d/head.log 2>&1 & p=\$!
  until grep -q "Ray runtime started" \$d/head.log; do sleep 0.05; done; echo \$ip > \$d/head.ip
else
  until [ -s \$d/head.ip ]; do sleep 0.05; done
: > \$d/w\$SLURM_NODEID.log
  setsid $RAY start --address=\$(cat \$d/head.ip):29379 \$common </dev/null >\$d/w\$SLURM_NODEID.log 2>&1 & p=\$!
  until grep -q "Ray runtime started" \$d/w\$SLURM_NODEID.log; do sleep 0.05; done
  date +%s%N > \$d/joined.\$SLURM_NODEID
fi
until [ -e \$d/stop ]; do sleep 0.05; done
kill -TERM \$p; wait \$p; pkill -9 -s \$p 2>/dev/null; rm -rf /tmp/rlb-\$SLURM_NODEID; true
EOS
chmod +x plain.sh
cat > job.yaml <<EOS
engine: vllm
model: tiny
parallel: {tensor: 3}
gpus_per_node: 1
vllm: {executable: $ROOT/tests/standin/vllm}
ray: {executable: $RAY, object_store_memory: 200MiB}
env: {STANDIN_EXPECT_NODES: 3}
timeouts: {shutdown_grace: 5s}
health: {heartbeat_interval: 1s, heartbeat_timeout: 5s}
EOS

A=(); B=(); R=(); C=(); D=()
for r in $(seq "$ROUNDS"); do
  # A: baseline
  d=$W/plain$r; mkdir -p $d; s=$(ms)
  srun -N3 ./plain.sh $d & sp=$!
  until [ -e $d/joined.1 ] && [ -e $d/joined.2 ]; do sleep 0.02; done
  e=$(( $(cat $d/joined.1 $d/joined.2 | sort -n | tail -1) / 1000000 ))
  A+=($(( e - s ))); touch $d/stop; wait $sp || true
  until [ -z "$(leftovers)" ]; do sleep 0.05; done

  # B + C: ray-launch to ready, then kill -9 of node3's raylet
  d=$W/rl$r; mkdir -p $d; cd $d; s=$(ms)
  srun -N3 -J rlbench "$ROOT/target/debug/ray-launch" --config ../job.yaml --event-log ev.jsonl >out.txt 2>&1 & sp=$!
  until grep -q '"event":"ready"' ev.jsonl 2>/dev/null; do sleep 0.02; done
  j=$(grep '"worker_joined"' ev.jsonl | tail -1 | sed 's/.*"t":\([0-9.]*\).*/\1/')
  rd=$(grep '"event":"ready"' ev.jsonl | sed 's/.*"t":\([0-9.]*\).*/\1/')
  t0=$(head -1 ev.jsonl | sed 's/.*"ts":"\([^"]*\)".*/\1/'); t0=$(( $(date -d "$t0" +%s%N) / 1000000 ))
  tms() { awk -v t="$1" 'BEGIN{printf "%d", t * 1000}'; }   # event-log seconds -> ms
  B+=($(( t0 - s + $(tms $j) )))   # srun start -> last worker joined
  R+=($(( t0 - s + $(tms $rd) )))
  for i in $(seq 50); do p=$(for q in $(ip netns pids sl-n3); do [ "$(cat /proc/$q/comm)" = raylet ] && echo $q; done; true); [ -n "$p" ] && break; sleep 0.1; done
  k=$(ms); kill -9 $p || true; wait $sp || true; C+=($(( $(ms) - k )))
  cd $W
  until [ -z "$(leftovers)" ]; do sleep 0.05; done

  # D: scancel -> nothing left
  d=$W/sc$r; mkdir -p $d; cd $d
  srun -N3 -J rlbench "$ROOT/target/debug/ray-launch" --config ../job.yaml --event-log ev.jsonl >out.txt 2>&1 & sp=$!
  until grep -q '"event":"ready"' ev.jsonl 2>/dev/null; do sleep 0.02; done
  k=$(ms); scancel -n rlbench; until [ -z "$(leftovers)" ]; do sleep 0.02; done; D+=($(( $(ms) - k ))); wait $sp || true
  cd $W
done
a=$(printf '%s\n' "${A[@]}" | median); b=$(printf '%s\n' "${B[@]}" | median); rr=$(printf '%s\n' "${R[@]}" | median)
c=$(printf '%s\n' "${C[@]}" | median); dd=$(printf '%s\n' "${D[@]}" | median)
echo "rounds: $ROUNDS (medians, ms)"
echo "A plain ray start, srun -> 3 nodes joined:        $a   (${A[*]})"
echo "B ray-launch,      srun -> 3 nodes joined:        $b   (${B[*]})  ratio B/A = $(awk -v b=$b -v a=$a 'BEGIN{printf "%.2f", b/a}')"
echo "  ray-launch,      srun -> endpoint ready:        $rr   (${R[*]})"
echo "C kill -9 worker raylet -> step ended everywhere: $c   (${C[*]})"
echo "D scancel -> nothing left on any node:            $dd   (${D[*]})"
