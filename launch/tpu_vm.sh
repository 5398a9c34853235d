#!/usr/bin/env bash
# Trains on every worker (host) of a Cloud TPU VM: copies this checkout to all workers, installs it, and starts
# one `python -m m3d_jax.train` per worker at once. JAX finds the other workers by itself (TPU metadata).
#
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a CONFIG=configs/lamed.py:stage2_phi3 \
#   WORKDIR=gs://my-bucket/runs/stage2 launch/tpu_vm.sh [--config.key=value ...]
#
# Required: TPU_NAME, ZONE, CONFIG (path inside the repo), WORKDIR (gs://...; every worker writes its shards of
# each checkpoint there). Optional:
#   PROJECT          Google Cloud project (default: gcloud's configured project)
#   REPO_DIR         where the code goes on each worker (default: m3d-jax in the remote home folder)
#   QUEUED_RESOURCE  multi-slice: address every node of this queued resource instead of TPU_NAME
#   LOG              remote log file (e.g. m3d-train.log): start detached, so closing this terminal does not stop
#                    training; read it with `gcloud compute tpus tpu-vm ssh ... --command="tail -f m3d-train.log"`
#   SKIP_SYNC=1      reuse the code and packages already on the workers (e.g. to resume after a preemption)
#   JAX_PIP          the JAX requirement installed for TPU (default: jax[tpu])
#   PYTHON           the workers' Python, e.g. a virtualenv's ~/venv/bin/python (default: python3)
# Any arguments are passed on to the trainer (config overrides such as --config.mesh.fsdp=4).
set -euo pipefail

: "${TPU_NAME:=}" "${QUEUED_RESOURCE:=}"
: "${ZONE:?set ZONE, the zone of the TPU}"
: "${CONFIG:?set CONFIG, e.g. configs/lamed.py:stage2_phi3}"
: "${WORKDIR:?set WORKDIR to a gs:// folder (checkpoints and logs of the run)}"
REPO_DIR=${REPO_DIR:-m3d-jax}
JAX_PIP=${JAX_PIP:-jax[tpu]}
PYTHON=${PYTHON:-python3}

if [[ $WORKDIR != gs://* ]]; then
  echo "WORKDIR=$WORKDIR: TPU workers share no filesystem, so checkpoints must go to gs://" >&2
  exit 1
fi
gcloud_flags=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  gcloud_flags+=(--project="$PROJECT")
fi
if [[ -n $QUEUED_RESOURCE ]]; then
  target=(queued-resources "$QUEUED_RESOURCE")
  every_host=(--worker=all --node=all)
  destination=$QUEUED_RESOURCE
elif [[ -n $TPU_NAME ]]; then
  target=(tpu-vm "$TPU_NAME")
  every_host=(--worker=all)
  destination=$TPU_NAME
else
  echo "set TPU_NAME (or QUEUED_RESOURCE for multi-slice)" >&2
  exit 1
fi

on_all_workers() {
  gcloud compute tpus "${target[0]}" ssh "${target[1]}" "${gcloud_flags[@]}" "${every_host[@]}" --command="$1"
}

if [[ ${SKIP_SYNC:-0} != 1 ]]; then
  # The working tree as it is here (tracked and untracked files, minus .gitignore'd ones): the workers run
  # exactly this code, uncommitted edits included, and need no access to the git remote.
  repo_root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  staging=$(mktemp -d)
  trap 'rm -rf "$staging"' EXIT
  archive=$staging/m3d-jax-src.tar.gz
  (
    cd "$repo_root"
    git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' path; do [[ -e $path ]] && printf '%s\0' "$path"; done \
      | tar --null -T - -czf "$archive"
  )
  gcloud compute tpus "${target[0]}" scp "$archive" "$destination:m3d-jax-src.tar.gz" \
    "${gcloud_flags[@]}" "${every_host[@]}"
  libtpu_index=https://storage.googleapis.com/jax-releases/libtpu_releases.html
  printf -v install 'mkdir -p %q && tar -xzf m3d-jax-src.tar.gz -C %q && %s -m pip install -q -e %q %q -f %q' \
    "$REPO_DIR" "$REPO_DIR" "$PYTHON" "$REPO_DIR" "$JAX_PIP" "$libtpu_index"
  on_all_workers "$install"
fi

printf -v train 'cd %q && %s -m m3d_jax.train --config=%q --workdir=%q' "$REPO_DIR" "$PYTHON" "$CONFIG" "$WORKDIR"
if (($#)); then
  printf -v overrides ' %q' "$@"
  train+=$overrides
fi
if [[ -n ${LOG:-} ]]; then
  printf -v log '%q' "$LOG"
  train="nohup bash -c $(printf '%q' "$train") > $log 2>&1 < /dev/null &"
fi
on_all_workers "$train"
