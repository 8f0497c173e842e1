#!/usr/bin/env bash
# Run one gptjax command as N cooperating JAX processes on this machine, on CPU devices
# talking through gloo: the multi-host code paths without a cluster.
#
#   launch/local.sh N <gptjax subcommand and its args>
#   launch/local.sh 2 train --config configs/quickstart.py --workdir runs/x
#
# Each process gets XLA_FLAGS as given, with --xla_force_host_platform_device_count=4
# added when they set no device count (4 CPU devices per process), the same
# free coordinator port on 127.0.0.1, and its JAX_PROCESS_ID; its output is prefixed
# with "[i] ". If any process fails the others are stopped (SIGTERM, then SIGKILL after
# LOCAL_KILL_GRACE seconds, default 10) and this script names the first process that
# failed and exits with its status (128+N for signal N: 137 after kill -9).
# SIGINT/SIGTERM sent to this script reach every process as SIGTERM (preemption: a
# training run saves a checkpoint; SIGKILL after LOCAL_STOP_GRACE seconds, default 120).
# Environment: PYTHON (default python3), XLA_FLAGS, JAX_PLATFORMS (default cpu), LOCAL_PORT.
set -u

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N <gptjax subcommand and its args>   (N >= 1 processes)" >&2
  exit 2
fi
n=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
# Keep the XLA_FLAGS given; without a device count in them, 4 CPU devices per process.
XLA_FLAGS=${XLA_FLAGS:-}
if [[ $XLA_FLAGS != *--xla_force_host_platform_device_count=* ]]; then
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=4"
fi
export XLA_FLAGS
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# A free port (LOCAL_PORT to choose one): bind to port 0 and read what the kernel gave.
port=${LOCAL_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')} || exit 1
export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n

pids=()
for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID=$i "$python" -m gptjax "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
  echo "local.sh: process $i of $n: pid $!" >&2
done

stop_all() {  # stop_all GRACE: SIGTERM every live process, SIGKILL what is left after GRACE s
  local pid deadline=$((SECONDS + $1))
  for pid in "${pids[@]}"; do [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    [[ -z $pid ]] && continue
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
  done
  wait 2>/dev/null
}

trap 'echo "local.sh: interrupted; stopping all processes" >&2; stop_all "${LOCAL_STOP_GRACE:-120}"; exit 143' INT TERM

# The first process to end with a failure is the one to blame (the others' collectives
# fail because of it): `wait -n` reports processes in the order they end.
left=$n
while ((left > 0)); do
  live=()
  for pid in "${pids[@]}"; do [[ -n $pid ]] && live+=("$pid"); done
  ended=""
  wait -n -p ended "${live[@]}"
  rc=$?
  [[ -z $ended ]] && continue
  for i in "${!pids[@]}"; do [[ ${pids[$i]} == "$ended" ]] && break; done
  pids[i]=""
  left=$((left - 1))
  if ((rc != 0)); then
    # Processes that ended together are reaped in any order: a signal's victim, not a
    # process whose collective failed (status 1) because of it, is the one to blame.
    for j in "${!pids[@]}"; do
      [[ -z ${pids[$j]} ]] || kill -0 "${pids[$j]}" 2>/dev/null && continue
      wait "${pids[$j]}"
      rc_j=$?
      pids[j]=""
      if ((rc_j > 128 && rc <= 128)); then i=$j rc=$rc_j; fi
    done
    how="status $rc"
    if ((rc > 128)) && sig=$(kill -l $((rc - 128)) 2>/dev/null); then how+=" (SIG$sig)"; fi
    echo "local.sh: process $i failed first: $how; stopping the others" >&2
    stop_all "${LOCAL_KILL_GRACE:-10}"
    exit "$rc"
  fi
done
wait  # the output prefixers
exit 0
