#!/usr/bin/env bash
# Run one gptjax command on every worker of one or more Cloud TPU VM slices: one JAX
# process per worker (TPU VM host). jax.distributed finds the coordinator (worker 0 of
# the first slice), the process count and ids from the TPU metadata, and for multislice
# the MEGASCALE_* settings that queued resources give each worker.
#
#   launch/tpu.sh TPU_NAME[,TPU_NAME...] <gptjax subcommand and its args>
#   ZONE=us-east5-a launch/tpu.sh my-v5p-64 train --config configs/gpt3/xl.py \
#       --workdir /mnt/shared/runs/xl
#
# Several names (comma-separated): the slices of a multislice queued resource, e.g.
# my-qr-0,my-qr-1. The workers must already hold the checkout at REPO_DIR with gptjax's
# dependencies installed (launch/README.md, "TPU pods"); --workdir must be a filesystem
# every worker shares (checkpoints are written by all of them).
# Environment: ZONE (required), PROJECT, REPO_DIR (default gptjax, relative to the
# workers' home), PYTHON (default python3), GPTJAX_ENV (extra VAR=value words put before
# the command on every worker, e.g. "XLA_FLAGS=... JAX_COMPILATION_CACHE_DIR=...").
set -uo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: ZONE=... $0 TPU_NAME[,TPU_NAME...] <gptjax subcommand and its args>" >&2
  exit 2
fi
: "${ZONE:?set ZONE to the TPU zone, e.g. ZONE=us-east5-a}"
IFS=, read -r -a tpus <<<"$1"
shift

remote="cd $(printf %q "${REPO_DIR:-gptjax}") && ${GPTJAX_ENV:-} ${PYTHON:-python3} -m gptjax$(printf ' %q' "$@")"
pids=()
for tpu in "${tpus[@]}"; do
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
    --worker=all --command "$remote" 2>&1 | sed -u "s/^/[$tpu] /" &
  pids+=($!)  # with pipefail, waiting for the pipeline gives gcloud's status
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
