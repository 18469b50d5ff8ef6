#!/usr/bin/env bash
# Benchmarks on the local Slurm bed (scripts/test.sh's setup must have run; brings the bed up).
# Everything a user would pick, in one run, ROUNDS times each; one line per figure:
#   name: median unit (each run)
# Start and stop go through sbatch, as users work: a batch script runs `srun ...`, and
# "nothing left" means no process of the job on any node *and* no temp dir of it.
#   - srun -> all 3 nodes joined: the ideal hand-written script (plain `ray start`, no sleeps),
#     Ray 2.60's `ray symmetric-run`, ray-launch (ray backend, stand-in engine);
#   - scancel -> nothing left: the same three; a time limit (sbatch -t 1) -> nothing left;
#   - kill -9 of each process ray-launch starts (raylet, gcs_server, ray start, the engine, a
#     worker's launcher) -> the step has ended on every node;
#   - a node gone silent (its launcher SIGSTOPped; its network link cut) -> nothing of the job
#     runs on the healthy nodes, and the step has ended;
#   - `ray stop` on one node; launcher + reaper resident memory per node;
#   - false alarms while every CPU is saturated (SATURATE seconds, default 60);
#   - 1,024 ranks against the coordinator (bench/rendezvous.rs, release build).
# ray-launch runs with the default config (only paths and the tiny model are set).
set -euo pipefail
ROUNDS=${ROUNDS:-3}
SATURATE=${SATURATE:-60}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
W=$(mktemp -d /tmp/rlbench.XXXXXX); chmod 755 "$W"; cd "$W"
trap 'scancel -u "$(id -un)" 2>/dev/null; for i in 1 2 3; do ip netns exec sl-n$i ip link set eth0 up 2>/dev/null; done; rm -rf "$W"' EXIT
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
# temp dirs of the three launchers (ray-launch's, the plain script's, symmetric-run's)
leftfiles() { ls -d /tmp/rl-[0-9]* /tmp/rlb-* /tmp/rls-* 2>/dev/null || true; }
# wait until nothing is left (at most 30 s): prints the ms it took, or 30000+ and what was left
gone_after() { local k=$1 lim=$(( $(ms) + 30000 ))
  while [ -n "$(leftovers)$(leftfiles)" ]; do
    if [ "$(ms)" -gt "$lim" ]; then
      echo "30000+ (left: $(for p in $(leftovers); do cat /proc/$p/comm; done | sort | uniq -c | tr -s ' \n' ' ')$(leftfiles | tr '\n' ' '))"
      for p in $(leftovers); do kill -9 "$p" 2>/dev/null; done; rm -rf /tmp/rlb-* /tmp/rls-* /tmp/rl-[0-9]*; return
    fi; sleep 0.02; done
  echo $(( $(ms) - k )); }
wait_queue_empty() { for _ in $(seq 600); do [ -z "$(squeue -h -u "$(id -un)" 2>/dev/null)" ] && return; sleep 0.05; done; }
ts_ms() { echo $(( $(date -d "$1" +%s%N) / 1000000 )); }
# the epoch ms of the first (or with $3 = last, the last) event $1 in the event log $2
ev_ms() { local t0 t; t0=$(head -1 "$2" | sed 's/.*"ts":"\([^"]*\)".*/\1/'); t=$(grep "\"event\":\"$1\"" "$2" | { [ "${3:-}" = last ] && tail -1 || head -1; } | sed 's/.*"t":\([0-9.]*\).*/\1/')
  echo $(( $(ts_ms "$t0") + $(awk -v t="$t" 'BEGIN{printf "%d", t * 1000}') )); }
# the first process on node $1 whose command line contains $2
pid_cmd() { for _ in $(seq 100); do for q in $(ip netns pids sl-n$1); do tr '\0' ' ' </proc/$q/cmdline 2>/dev/null | grep -q -- "$2" && { echo "$q"; return; }; done; sleep 0.05; done; }
# processes on node $1 that are not the bed's own
node_left() { for q in $(ip netns pids sl-n$1); do case "$(cat /proc/$q/comm 2>/dev/null)" in ''|unshare|tini|slurmd|slurmstepd) ;; *) echo "$q" ;; esac; done; }
pid_on_now() { for q in $(ip netns pids sl-n$1); do [ "$(cat /proc/$q/comm 2>/dev/null)" = "$2" ] && { echo "$q"; return; }; done; true; }

cat > plain.sh <<EOS
#!/bin/bash
# the ideal hand-written launcher: no fixed sleeps; stops its Ray on SIGTERM
d=\$1; ip=\$(ip -4 -o addr show eth0 | awk '{print \$4}' | cut -d/ -f1)
common="--block --node-ip-address=\$ip --num-cpus=1 --num-gpus=0 --object-store-memory=200000000 --temp-dir=/tmp/rlb-\$SLURM_NODEID --disable-usage-stats"
trap 'kill -TERM \$p; wait \$p; rm -rf /tmp/rlb-\$SLURM_NODEID; exit 0' TERM
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
while :; do sleep 0.05; done
EOS
cat > sym.sh <<EOS
#!/bin/bash
# Ray's own: the same command on every node; the head runs the entrypoint once 3 nodes joined
# (it runs ray from PATH and finds the cluster through RAY_ADDRESS on the head)
d=\$1; head=\$(getent hosts \$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -1) | awk '{print \$1}')
export PATH=$ROOT/.venv/bin:\$PATH RAY_ADDRESS=\$head:29381
exec $RAY symmetric-run --address \$head:29381 --min-nodes 3 --num-cpus=1 --num-gpus=0 --object-store-memory=200000000 --temp-dir=/tmp/rls-\$SLURM_NODEID --disable-usage-stats -- bash -c "date +%s%N > \$d/joined; exec sleep 100000"
EOS
chmod +x plain.sh sym.sh
write_job_yaml job.yaml
# sbatch the 3-node job script $2 [with sbatch options $3...] in dir $1 (srun's start time
# goes to $1/t_srun); prints the job id
submit() { local d=$1 script=$2; shift 2; mkdir -p "$d"
  sbatch -N3 -J rlbench -o "$d/batch.out" -D "$d" "$@" "$W/$script" | awk '{print $4}'; }
batch() { printf '#!/bin/bash\ndate +%%s%%N > t_srun\n%s\n' "$1" > "$2"; chmod +x "$2"; }
batch "srun $W/plain.sh \$PWD" plain.sbatch
batch "srun $W/sym.sh \$PWD" sym.sbatch
batch "srun $RL --config $W/job.yaml --event-log ev.jsonl" rl.sbatch
joined_ms() { echo $(( ($1 - $(cat "$2")) / 1000000 )); }
wait_file() { for _ in $(seq 1200); do [ -e "$1" ] && return 0; sleep 0.025; done; echo "timed out waiting for $1" >&2; return 1; }

declare -A F   # figure name -> space-separated runs
add() { F[$1]="${F[$1]:-} $2"; }
SYM_WHY=""
for r in $(seq "$ROUNDS"); do
  # plain: srun -> joined, scancel -> nothing left
  d=$W/plain$r; j=$(submit "$d" plain.sbatch)
  wait_file "$d/joined.1"; wait_file "$d/joined.2"
  add "plain ray start, srun -> 3 nodes joined" "$(joined_ms "$(cat "$d"/joined.1 "$d"/joined.2 | sort -n | tail -1)" "$d/t_srun")"
  k=$(ms); scancel "$j"; add "plain ray start, scancel -> nothing left" "$(gone_after "$k")"; wait_queue_empty

  # ray symmetric-run
  d=$W/sym$r; j=$(submit "$d" sym.sbatch)
  if wait_file "$d/joined" 2>/dev/null || wait_file "$d/joined" 2>/dev/null; then
    add "ray symmetric-run, srun -> 3 nodes joined" "$(joined_ms "$(cat "$d/joined")" "$d/t_srun")"
    k=$(ms); scancel "$j"; add "ray symmetric-run, scancel -> nothing left" "$(gone_after "$k")"
  else
    SYM_WHY="its entrypoint never started within 30 s: $(tail -3 "$d/batch.out" | tr '\n' ' ')"; scancel "$j"; gone_after "$(ms)" >/dev/null
  fi
  wait_queue_empty

  # ray-launch: joined, ready, memory, scancel
  d=$W/rl$r; j=$(submit "$d" rl.sbatch); wait_ready "$d"
  add "ray-launch, srun -> 3 nodes joined" $(( $(ev_ms worker_joined "$d/ev.jsonl" last) - $(cat "$d/t_srun") / 1000000 ))
  add "ray-launch, srun -> endpoint ready" $(( $(ev_ms ready "$d/ev.jsonl") - $(cat "$d/t_srun") / 1000000 ))
  for i in 1 2 3; do kb=0; for q in $(ip netns pids sl-n$i); do [ "$(cat /proc/$q/comm 2>/dev/null)" = ray-launch ] && kb=$(( kb + $(awk '/VmRSS/{print $2}' /proc/$q/status) )); done; add "ray-launch, launcher + reaper resident memory per node (KiB)" "$kb"; done
  k=$(ms); scancel "$j"; add "ray-launch, scancel -> nothing left" "$(gone_after "$k")"; wait_queue_empty

  # kill -9 of each process ray-launch started -> the step has ended everywhere
  for what in "3 raylet" "1 gcs_server" "2 ray" "1 engine" "2 ray-launch"; do
    set -- $what; d=$W/k$r-$2-$1; j=$(submit "$d" rl.sbatch); wait_ready "$d"
    if [ "$2" = engine ]; then p=$(pid_cmd "$1" standin/); else p=$(pid_on "$1" "$2"); fi
    k=$(ms); kill -9 "$p"
    if [ "$2" = ray-launch ]; then
      # the reaper: SIGTERM to the launcher's whole tree (tagged processes too), SIGKILL of
      # what is left within 1 s
      until [ -z "$(node_left "$1")" ] || [ $(( $(ms) - k )) -gt 30000 ]; do sleep 0.02; done
      add "ray-launch, kill -9 of node$1's launcher -> nothing of it left on node$1 (reaper)" $(( $(ms) - k ))
    fi
    until ! squeue -h -j "$j" 2>/dev/null | grep -q .; do sleep 0.02; done
    add "ray-launch, kill -9 $2 on node$1 -> step ended everywhere" $(( $(ms) - k ))
    gone_after "$(ms)" >/dev/null
  done

  # a silent node: its launcher SIGSTOPped, or its link cut -> nothing of the job on the others
  d=$W/stop$r; j=$(submit "$d" rl.sbatch); wait_ready "$d"
  p=$(pid_on 3 ray-launch); k=$(ms); kill -STOP "$p"
  until [ -z "$(for i in 1 2; do for q in $(ip netns pids sl-n$i); do case $(cat /proc/$q/comm 2>/dev/null) in unshare|tini|slurmd|slurmstepd|"") ;; *) echo $q;; esac; done; done)" ]; do sleep 0.02; done
  add "ray-launch, SIGSTOP of node3's launcher -> nothing left on the others" $(( $(ms) - k ))
  until ! squeue -h -j "$j" 2>/dev/null | grep -q .; do sleep 0.02; [ $(( $(ms) - k )) -gt 30000 ] && break; done
  add "ray-launch, SIGSTOP of node3's launcher -> step ended (scancel of the step)" $(( $(ms) - k ))
  kill -CONT "$p" 2>/dev/null || true; gone_after "$(ms)" >/dev/null; wait_queue_empty

  d=$W/cut$r; j=$(submit "$d" rl.sbatch); wait_ready "$d"
  k=$(ms); ip netns exec sl-n3 ip link set eth0 down
  # node3 cleans itself up (its launcher finds the master silent); the master waits out the
  # teardown budget for node3, whose slurmd it cannot reach either: count what they started
  until [ -z "$(leftovers | while read -r q; do case $(cat /proc/$q/comm 2>/dev/null) in ray-launch|scancel|srun|slurm_script|"") ;; *) echo $q;; esac; done)" ] && [ -z "$(pid_on_now 3 ray-launch)" ]; do sleep 0.02; [ $(( $(ms) - k )) -gt 30000 ] && break; done
  add "ray-launch, node3's link cut -> nothing it started runs on any node, node3's launcher gone" $(( $(ms) - k ))
  ip netns exec sl-n3 ip link set eth0 up; gone_after "$(ms)" >/dev/null; scancel "$j" 2>/dev/null || true; wait_queue_empty

  # ray stop on one node (what a user's script might call instead; host-wide)
  ip=$(ip netns exec sl-n1 ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
  nsenter -t "$(pid_on 1 tini)" -n -p -m "$RAY" start --head --port=29383 --node-ip-address="$ip" --num-cpus=1 --include-dashboard=false --object-store-memory=200000000 --temp-dir=/tmp/rlb-stop --disable-usage-stats >/dev/null 2>&1
  k=$(ms); nsenter -t "$(pid_on 1 tini)" -n -p -m "$RAY" stop >/dev/null 2>&1; add "ray stop on one node" $(( $(ms) - k ))
  gone_after "$(ms)" >/dev/null
done

# a time limit: sbatch -t 1; from the launcher's SIGTERM (event log) to nothing left
d=$W/tl; j=$(submit "$d" rl.sbatch -t 1); wait_ready "$d"
until grep -q '"event":"stop_requested"' "$d/ev.jsonl"; do sleep 0.05; done
g=$(gone_after "$(ev_ms stop_requested "$d/ev.jsonl")")
add "ray-launch, time limit (sbatch -t 1) -> nothing left" "$g"; wait_queue_empty

# saturated CPUs: busy loops on every node while a job serves; any failure is a false alarm
d=$W/sat; j=$(submit "$d" rl.sbatch); wait_ready "$d"
for i in 1 2 3; do for _ in 1 2 3 4; do nsenter -t "$(pid_on $i tini)" -n -p -m timeout "$SATURATE" sh -c 'while :; do :; done' & done; done
sleep "$SATURATE"; wait
alarms=$(grep -c '"event":"failure"' "$d/ev.jsonl" || true)
squeue -h -j "$j" | grep -q . || alarms="$alarms (the job ended: $(tail -2 "$d/batch.out" | tr '\n' ' '))"
scancel "$j"; gone_after "$(ms)" >/dev/null; wait_queue_empty

echo "rounds: $ROUNDS (medians; each run in parentheses)"
for name in "plain ray start, srun -> 3 nodes joined" "ray symmetric-run, srun -> 3 nodes joined" "ray-launch, srun -> 3 nodes joined" "ray-launch, srun -> endpoint ready" \
  "plain ray start, scancel -> nothing left" "ray symmetric-run, scancel -> nothing left" "ray-launch, scancel -> nothing left" "ray-launch, time limit (sbatch -t 1) -> nothing left" \
  "ray-launch, kill -9 raylet on node3 -> step ended everywhere" "ray-launch, kill -9 gcs_server on node1 -> step ended everywhere" "ray-launch, kill -9 ray on node2 -> step ended everywhere" \
  "ray-launch, kill -9 engine on node1 -> step ended everywhere" "ray-launch, kill -9 ray-launch on node2 -> step ended everywhere" \
  "ray-launch, kill -9 of node2's launcher -> nothing of it left on node2 (reaper)" \
  "ray-launch, SIGSTOP of node3's launcher -> nothing left on the others" "ray-launch, SIGSTOP of node3's launcher -> step ended (scancel of the step)" \
  "ray-launch, node3's link cut -> nothing it started runs on any node, node3's launcher gone" "ray stop on one node" "ray-launch, launcher + reaper resident memory per node (KiB)"; do
  runs=${F[$name]:-}
  if [ -z "$runs" ]; then
    case $name in "ray symmetric-run"*) echo "$name: did not run ($SYM_WHY)";; *) echo "$name: no figure";; esac; continue
  fi
  unit=ms; case $name in *KiB*) unit=KiB;; esac
  m=$(printf '%s\n' $runs | grep -E '^[0-9]+$' | median || true)
  echo "$name: ${m:-n/a} $unit ($(echo $runs))"
done
echo "ray-launch, false alarms with every CPU saturated for ${SATURATE}s (4 busy loops per node): $alarms"
a=$(printf '%s\n' ${F["plain ray start, srun -> 3 nodes joined"]:-} | median); b=$(printf '%s\n' ${F["ray-launch, srun -> 3 nodes joined"]:-} | median)
[ -n "$a" ] && [ -n "$b" ] && echo "ratio ray-launch / plain, srun -> 3 nodes joined: $(awk -v b="$b" -v a="$a" 'BEGIN{printf "%.2f", b/a}')"
(cd "$ROOT" && cargo bench -q --bench rendezvous 2>/dev/null)
