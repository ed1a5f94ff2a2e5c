#!/usr/bin/env bash
# Cloud TPU VM (single host or multi-host slice): create it, install ssl_jax + jax[tpu] on every worker,
# run the same `ssl-jax train ... --distributed` on every worker, stream the log, delete it.
#
# usage: launch/tpu_vm.sh [options] COMMAND [CONFIG] [--config.KEY=VALUE ...]
#
# commands:
#   create                   create the TPU VM
#   install                  copy this checkout to every worker; install it and jax[tpu] in ~/ssl_jax_venv
#   train CONFIG [OVERRIDES] start `ssl-jax train --config CONFIG --workdir W --distributed OVERRIDES` on
#                            every worker (in the background, survives a dropped ssh), then follow the log
#   up CONFIG [OVERRIDES]    create + install + train
#   logs                     follow worker $LOG_WORKER's log (default 0: process 0 logs the progress)
#   stop                     SIGTERM the trainers: they save a checkpoint and exit (train again resumes)
#   sync CONFIG              copy the workdir to $SYNC_TO now (gcloud storage rsync, from worker 0)
#   copy FILE                copy a local file (e.g. a dataset archive) to ~/data/ on every worker
#   delete                   delete the TPU VM (the VM's disks and a local workdir go with it)
# options (or the environment variable in brackets):
#   --name NAME              TPU name [TPU_NAME] (default ssl-jax)
#   --zone ZONE              [ZONE] (default us-central2-b)
#   --accelerator-type TYPE  [ACCELERATOR_TYPE] (default v4-8), e.g. v4-32, v5litepod-16, v6e-8
#   --version VERSION        TPU runtime [RUNTIME_VERSION] (default from the type: tpu-ubuntu2204-base for
#                            v2-v4, v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p,
#                            v2-alpha-tpuv6e for v6e)
#   --project PROJECT        [PROJECT] (default: gcloud's configured project)
#   --spot                   [SPOT=1] create a Spot (preemptible) TPU VM
#   --workdir DIR            [WORKDIR] run directory on the workers, relative to ~/ssl_jax
#                            (default runs/<method>_<preset>; /mnt/ssl_jax/runs/... with NFS_SHARE)
#   -h, --help               this message
# more environment:
#   SYNC_TO=gs://B/P         train pulls gs://B/P into the workdir first (resume after the VM was lost) and
#                            pushes the workdir there every $SYNC_EVERY seconds (default 600) and at the end
#   NFS_SHARE=IP:/share      install mounts this NFS share (e.g. Filestore) at /mnt/ssl_jax on every worker
#   SHARED_WORKDIR=1         you mounted a filesystem shared by all workers yourself and WORKDIR is on it
#   PYTHON_VERSION           Python for ~/ssl_jax_venv (default 3.12; installed by uv: the images ship 3.10)
#   JAX_SPEC                 what to pip install for JAX (default "jax[tpu]")
#   NO_FOLLOW=1              train returns after starting instead of following the log
#   DRY_RUN=1                print the commands instead of running them
#
# Workdir: checkpoints (orbax) are written by all processes together and read by all on resume, so on a
# multi-host slice (more than 8 chips/cores: v4-16 and up, v5litepod-16 and up) WORKDIR must be on a
# filesystem every worker mounts at the same path (NFS_SHARE, or SHARED_WORKDIR=1). gs:// workdirs are
# refused: the trainer writes metrics.jsonl, config.json and checkpoint paths through the local
# filesystem (os.makedirs / open / os.path.abspath), so a gs:// path would become a local folder named
# "gs:". On a single-host VM a local workdir is right; use SYNC_TO to keep a copy in a bucket.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: error: $*" >&2; echo "run with -h for usage" >&2; exit 2; }
# Prints the command shell-quoted (DRY_RUN=1) or runs it.
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
q() { printf '%q' "$1"; }  # quotes one word for the workers' shell

TPU_NAME="${TPU_NAME:-ssl-jax}"; ZONE="${ZONE:-us-central2-b}"; ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"; PROJECT="${PROJECT:-}"; SPOT="${SPOT:-0}"; WORKDIR="${WORKDIR:-}"
COMMAND=""; CONFIG=""; OVERRIDES=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name|--zone|--accelerator-type|--version|--project|--workdir)
      (($# >= 2)) || die "$1 needs a value"; set -- "$1=$2" "${@:3}" ;;
    --name=*) TPU_NAME="${1#*=}"; shift ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}"; shift ;;
    --version=*) RUNTIME_VERSION="${1#*=}"; shift ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --spot) SPOT=1; shift ;;
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --config.*) (($# >= 2)) || die "$1 needs a value"; OVERRIDES+=("$1=$2"); shift 2 ;;
    -*) die "unknown option $1 (overrides are --config.KEY=VALUE)" ;;
    *) if [[ -z "$COMMAND" ]]; then COMMAND="$1"; elif [[ -z "$CONFIG" ]]; then CONFIG="$1";
       else die "unexpected argument $1"; fi; shift ;;
  esac
done
[[ -n "$COMMAND" ]] || { usage >&2; die "COMMAND is required"; }
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"; JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
SYNC_TO="${SYNC_TO:-}"; SYNC_EVERY="${SYNC_EVERY:-600}"; NFS_SHARE="${NFS_SHARE:-}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE"); [[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
VENV_BIN='~/ssl_jax_venv/bin'  # expanded by the workers' shell
LOG='~/ssl_jax_train.log'; PIDFILE='~/ssl_jax_train.pid'

on_workers() {
  [[ "${DRY_RUN:-0}" == 1 ]] && echo "# worker(s) $1 run: $2"  # the same command, readable
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}
multi_host() { local n="${ACCELERATOR_TYPE##*-}"; [[ "$n" =~ ^[0-9]+$ ]] && ((n > 8)); }

resolve_workdir() {
  if [[ -z "$WORKDIR" ]]; then
    [[ -n "$CONFIG" ]] || die "$COMMAND needs CONFIG (or --workdir)"
    local stem preset; stem="$(basename "${CONFIG%%:*}" .py)"; preset="${CONFIG#*:}"
    [[ "$preset" == "$CONFIG" ]] && preset=default
    WORKDIR="runs/${stem}_${preset}"; [[ -n "$NFS_SHARE" ]] && WORKDIR="/mnt/ssl_jax/$WORKDIR"
  fi
  [[ "$WORKDIR" != gs://* ]] || die "a gs:// workdir is not supported yet (the trainer writes through the local filesystem); use a local or NFS workdir and SYNC_TO=$WORKDIR"
  if multi_host && [[ -z "$NFS_SHARE" && "${SHARED_WORKDIR:-0}" != 1 ]]; then
    die "$ACCELERATOR_TYPE has several workers: the workdir must be shared by all of them (set NFS_SHARE=IP:/share before install, or mount one yourself and set SHARED_WORKDIR=1)"
  fi
}

cmd_create() {
  local extra=(); [[ "$SPOT" == 1 ]] && extra+=(--spot)
  run "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
}

cmd_install() {
  local tgz="${TMPDIR:-/tmp}/ssl_jax_src.$$.tgz"
  run tar -czf "$tgz" --exclude=__pycache__ -C "$REPO_ROOT" setup.py README.md ssl_jax configs launch
  run "${GCLOUD[@]}" scp "$tgz" "$TPU_NAME:ssl_jax_src.tgz" "${WHERE[@]}" --worker=all
  # uv brings its own Python: the TPU images ship Python 3.10 and ssl_jax needs 3.11+.
  local script="set -e; mkdir -p ~/ssl_jax && tar -xzf ~/ssl_jax_src.tgz -C ~/ssl_jax"
  script+=" && { python3 -m pip install --user -q -U uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  script+=" && ~/.local/bin/uv venv -q --allow-existing --python $(q "$PYTHON_VERSION") ~/ssl_jax_venv"
  script+=" && ~/.local/bin/uv pip install -q --python $VENV_BIN/python -U $(q "$JAX_SPEC") -e ~/ssl_jax"
  script+=" && $VENV_BIN/python -c 'import jax, ssl_jax; print(\"jax\", jax.__version__, \"ok\")'"
  if [[ -n "$NFS_SHARE" ]]; then
    script+="; sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common && sudo mkdir -p /mnt/ssl_jax"
    script+=" && { mountpoint -q /mnt/ssl_jax || sudo mount -t nfs -o rw,hard $(q "$NFS_SHARE") /mnt/ssl_jax; }"
    script+=" && { sudo chmod a+rwx /mnt/ssl_jax || true; }"
  fi
  on_workers all "$script"
  run rm -f "$tgz"
}

cmd_train() {
  [[ -n "$CONFIG" ]] || die "train needs CONFIG"
  resolve_workdir
  local train=("$VENV_BIN/ssl-jax" train --config "$CONFIG" --workdir "$WORKDIR" --distributed ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  local quoted="${train[0]}" w; for w in "${train[@]:1}"; do quoted+=" $(q "$w")"; done
  local wd; wd="$(q "$WORKDIR")"
  if [[ -n "$SYNC_TO" ]]; then  # resume from the bucket's copy when this VM has none (a new or preempted VM)
    on_workers 0 "cd ~/ssl_jax && mkdir -p $wd && { gcloud storage rsync -r $(q "$SYNC_TO") $wd || echo 'nothing to pull from $SYNC_TO'; }"
  fi
  local script="cd ~/ssl_jax && if [ -f $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null;"
  script+=" then echo \"a run is already going on \$(hostname)\" >&2; exit 1; fi"
  script+="; setsid nohup $quoted > $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE"
  on_workers all "$script"
  if [[ -n "$SYNC_TO" ]]; then
    local push="gcloud storage rsync -r --delete-unmatched-destination-objects $wd $(q "$SYNC_TO")"
    local loop="while kill -0 \$(cat $PIDFILE) 2>/dev/null; do sleep $(q "$SYNC_EVERY"); $push; done; $push"
    on_workers 0 "cd ~/ssl_jax && setsid nohup bash -c $(q "$loop") > ~/ssl_jax_sync.log 2>&1 < /dev/null &"
  fi
  [[ "${NO_FOLLOW:-0}" == 1 ]] || cmd_logs
}

cmd_logs() { on_workers "${LOG_WORKER:-0}" "tail -n 200 -F $LOG"; }
cmd_stop() { on_workers all "kill -TERM \"\$(cat $PIDFILE)\" && echo \"SIGTERM sent on \$(hostname)\""; }
cmd_sync() {
  [[ -n "$SYNC_TO" ]] || die "sync needs SYNC_TO=gs://bucket/path"
  resolve_workdir
  on_workers 0 "cd ~/ssl_jax && gcloud storage rsync -r $(q "$WORKDIR") $(q "$SYNC_TO")"
}
cmd_copy() {
  [[ -n "$CONFIG" ]] || die "copy needs FILE"
  on_workers all "mkdir -p ~/data"
  run "${GCLOUD[@]}" scp "$CONFIG" "$TPU_NAME:data/" "${WHERE[@]}" --worker=all
}
cmd_delete() { run "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet; }

case "$COMMAND" in
  create) cmd_create ;;
  install) cmd_install ;;
  train) cmd_train ;;
  up) [[ -n "$CONFIG" ]] || die "up needs CONFIG"; resolve_workdir; cmd_create; cmd_install; cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  sync) cmd_sync ;;
  copy) cmd_copy ;;
  delete) cmd_delete ;;
  *) die "unknown command $COMMAND" ;;
esac
