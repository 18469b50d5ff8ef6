#!/usr/bin/env bash
# Soak on the local Slurm bed: CYCLES (default 50) sbatch jobs of ray-launch (ray backend,
# stand-in engine, default config), each ended a different way, in turn:
#   scancel | a client that exits | kill -9 of a worker's launcher | kill -9 of a raylet | a time limit
# After each cycle (once the job left the queue) it counts what is left: processes on the
# nodes, the job's temp dirs, new files in /tmp and /dev/shm, listening ports in the nodes'
# namespaces, jobs in the queue. Prints one table row per cycle and the totals; exit 1 when
# anything was left. `bash bench/soak.sh` (scripts/test.sh's setup must have run).
set -euo pipefail
CYCLES=${CYCLES:-50}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
W=$(mktemp -d /tmp/rlsoak.XXXXXX); chmod 755 "$W"; cd "$W"
trap 'scancel -u "$(id -un)" 2>/dev/null; rm -rf "$W"' EXIT
write_job_yaml job.yaml
printf '#!/bin/bash\nsrun %s --config %s/job.yaml --event-log ev.jsonl\n' "$RL" "$W" > serve.sbatch
printf '#!/bin/bash\nsrun %s --config %s/job.yaml --event-log ev.jsonl -- /bin/true\n' "$RL" "$W" > client.sbatch
listening() { for i in 1 2 3; do ip netns exec sl-n$i ss -Hltn 2>/dev/null | awk '{print $4}' | grep -v ':6818$' || true; done; }
snap() { { ls -A /tmp; ls -A /dev/shm | sed 's#^#/dev/shm/#'; } | sort; }
modes=(scancel client kill-launcher kill-raylet time-limit)
printf '%-5s %-14s %-6s %-9s %-6s %-9s %-10s %-7s %-6s\n' cycle how job processes tmp_dirs new_files listening queued secs
tot=0
for c in $(seq "$CYCLES"); do
  mode=${modes[$(( (c - 1) % ${#modes[@]} ))]}
  d=$W/c$c; mkdir -p "$d"; before=$(snap); t0=$(date +%s)
  case $mode in
    client) j=$(sbatch -N3 -J rlsoak -o "$d/batch.out" -D "$d" "$W/client.sbatch" | awk '{print $4}') ;;
    time-limit) j=$(sbatch -N3 -J rlsoak -t 1 -o "$d/batch.out" -D "$d" "$W/serve.sbatch" | awk '{print $4}') ;;
    *) j=$(sbatch -N3 -J rlsoak -o "$d/batch.out" -D "$d" "$W/serve.sbatch" | awk '{print $4}') ;;
  esac
  if [ "$mode" != client ]; then wait_ready "$d" || echo "cycle $c: job $j never became ready" >&2; fi
  case $mode in
    scancel) scancel "$j" ;;
    kill-launcher) kill -9 "$(pid_on 2 ray-launch)" ;;
    kill-raylet) kill -9 "$(pid_on 3 raylet)" ;;
  esac
  for _ in $(seq 2400); do squeue -h -j "$j" 2>/dev/null | grep -q . || break; sleep 0.05; done
  # what Slurm and the launchers had to clean is given a moment, as a user's next job would
  sleep 1
  np=$(leftovers | wc -l); nd=$(ls -d /tmp/rl-"$j".* 2>/dev/null | wc -l || true)
  # new files present in two looks a second apart (what other processes of the machine make
  # and remove in passing does not count)
  new1=$(comm -13 <(echo "$before") <(snap) | grep -v "^$(basename "$W")\$" || true); sleep 1
  newf=$(comm -12 <(echo "$new1") <(comm -13 <(echo "$before") <(snap)) | grep . || true)
  nf=$(echo -n "$newf" | grep -c . || true)
  nl=$(listening | grep -c . || true); nq=$(squeue -h -u "$(id -un)" | grep -c . || true)
  printf '%-5s %-14s %-6s %-9s %-6s %-9s %-10s %-7s %-6s\n' "$c" "$mode" "$j" "$np" "$nd" "$nf" "$nl" "$nq" $(( $(date +%s) - t0 ))
  left=$(( np + nd + nf + nl + nq )); tot=$(( tot + left ))
  if [ "$left" -gt 0 ]; then
    { echo "cycle $c ($mode, job $j) left:"; for p in $(leftovers); do echo "  process $p $(cat /proc/$p/comm 2>/dev/null)"; done
      { ls -d /tmp/rl-"$j".* 2>/dev/null || true; } | sed 's/^/  dir /'; echo -n "$newf" | sed 's/^/  file /'; listening | sed 's/^/  port /'; } >&2 || true
    for p in $(leftovers); do kill -9 "$p" 2>/dev/null || true; done; scancel -u "$(id -un)" 2>/dev/null || true; sleep 1
  fi
done
echo "soak: $CYCLES cycles, left over in total: $tot"
[ "$tot" -eq 0 ]
