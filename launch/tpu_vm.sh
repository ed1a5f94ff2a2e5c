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
#   stop                     SIGTERM the trainers: they save a checkpoint and exit (train again resumes);
#                            waits (at most $STOP_WAIT s, default 300) until they have exited and the SYNC_TO
#                            loop's final push is done, so `stop` then `delete` loses nothing; exit 1 if not
#   sync CONFIG              copy the workdir to $SYNC_TO now (gcloud storage rsync, from worker 0; only a
#                            workdir that train bound to SYNC_TO, see below)
#   copy FILE                copy a local file (e.g. a dataset archive) to ~/data/ on every worker
#   delete                   delete the TPU VM (the VM's disks and a local workdir go with it)
# options (or the environment variable in brackets):
#   --name NAME              TPU name [TPU_NAME] (default ssl-jax)
#   --zone ZONE              [ZONE] (default from the type: us-central2-b for v4, us-west4-a for v5litepod,
#                            us-east5-a for v5p, us-east5-b for v6e; other types need ZONE. Other zones offer
#                            them too: gcloud compute tpus locations list, or the Cloud TPU regions page)
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
#   SYNC_TO=gs://B/P         keep a copy of the workdir in a bucket (see "SYNC_TO" below): worker 0 pushes the
#                            workdir there every $SYNC_EVERY seconds (default 600) and as soon as the trainer
#                            exits; train on a VM whose workdir has no checkpoint first pulls it from there
#   NFS_SHARE=IP:/share      install and train mount this NFS share (e.g. Filestore) at /mnt/ssl_jax on every
#                            worker (train again, as a rebooted worker has lost the mount)
#   SHARED_WORKDIR=1         you mounted a filesystem shared by all workers yourself and WORKDIR (an absolute
#                            path on it) is required
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
#
# SYNC_TO: the push mirrors the workdir (--delete-unmatched-destination-objects: checkpoints that orbax
# rotated out go from the bucket too), so it runs only from a workdir bound to SYNC_TO (WORKDIR/.sync_to
# holds the URL). Before starting, train on worker 0 binds it only when
#   - the workdir has no finished checkpoint: SYNC_TO's files are pulled first (a new or preempted VM
#     resumes), or SYNC_TO is empty (`gcloud storage ls` says it matched no objects: a new run);
#   - the workdir has checkpoints and is bound to SYNC_TO already (stop, then train: nothing is pulled, so
#     the bucket's older metrics.jsonl / config.json / runs.jsonl never replace the newer local ones);
#   - the workdir has checkpoints of a run never synced there and SYNC_TO is empty.
# Anything else aborts train before a trainer starts: a listing or pull that fails (no access, no such
# bucket, network), or a workdir with checkpoints of its own while SYNC_TO holds files. So a run never
# starts from step 0 beside a bucket holding checkpoints, and never pushes over them. Use one SYNC_TO per
# run: two VMs pushing to one SYNC_TO would delete each other's checkpoints. An earlier sync loop still
# pushing is waited for (at most $STOP_WAIT s) and then replaced, never run twice.
# Spot preemption: the preempted VM still exists (state PREEMPTED), so create/up fail with ALREADY_EXISTS:
# `delete`, then `up` with the same SYNC_TO (or NFS workdir) resumes from the newest checkpoint pushed.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: error: $*" >&2; echo "run with -h for usage" >&2; exit 2; }
# Prints the command shell-quoted (DRY_RUN=1) or runs it.
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
q() { printf '%q' "$1"; }  # quotes one word for the workers' shell

TPU_NAME="${TPU_NAME:-ssl-jax}"; ZONE="${ZONE:-}"; ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
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
if [[ -z "$ZONE" ]]; then  # a zone that offers the type (Cloud TPU regions page); v4 is in us-central2-b only
  case "$ACCELERATOR_TYPE" in
    v4-*) ZONE=us-central2-b ;;
    v5litepod-*|v5e-*) ZONE=us-west4-a ;;
    v5p-*) ZONE=us-east5-a ;;
    v6e-*) ZONE=us-east5-b ;;
    *) die "set ZONE (or --zone) to a zone that offers $ACCELERATOR_TYPE (gcloud compute tpus locations list," \
           "or the Cloud TPU regions page)" ;;
  esac
fi
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"; JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
SYNC_TO="${SYNC_TO:-}"; SYNC_EVERY="${SYNC_EVERY:-600}"; NFS_SHARE="${NFS_SHARE:-}"; STOP_WAIT="${STOP_WAIT:-300}"
[[ "$SYNC_EVERY" =~ ^[0-9]+$ ]] || die "SYNC_EVERY must be a whole number of seconds (got $SYNC_EVERY)"
[[ "$STOP_WAIT" =~ ^[0-9]+$ ]] || die "STOP_WAIT must be a whole number of seconds (got $STOP_WAIT)"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE"); [[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
VENV_BIN='~/ssl_jax_venv/bin'  # expanded by the workers' shell
LOG='~/ssl_jax_train.log'; PIDFILE='~/ssl_jax_train.pid'
# Shell tests run on the workers: is the trainer (pid in ~/ssl_jax_train.pid) or the sync loop (pid in
# ~/ssl_jax_sync.pid) running? A stale file (a rebooted worker) may name another process: hence the
# look at its command line.
alive() {  # the test for pid file $1 naming a live process whose command line contains $2
  printf '{ p=$(cat %s 2>/dev/null) && kill -0 "$p" 2>/dev/null && grep -q %s "/proc/$p/cmdline" 2>/dev/null; }' \
    "$1" "$2"
}
TRAINER_ALIVE="$(alive '~/ssl_jax_train.pid' ssl-jax)"; SYNC_ALIVE="$(alive '~/ssl_jax_sync.pid' ssl_jax_sync)"

on_workers() {
  [[ "${DRY_RUN:-0}" == 1 ]] && echo "# worker(s) $1 run: $2"  # the same command, readable
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}
multi_host() { local n="${ACCELERATOR_TYPE##*-}"; [[ "$n" =~ ^[0-9]+$ ]] && ((n > 8)); }
# Mounts NFS_SHARE at /mnt/ssl_jax unless it is mounted already (install, and train: a reboot loses it).
nfs_mount() {
  echo "sudo mkdir -p /mnt/ssl_jax && { mountpoint -q /mnt/ssl_jax ||" \
       "sudo mount -t nfs -o rw,hard $(q "$NFS_SHARE") /mnt/ssl_jax; }"
}

resolve_workdir() {
  if [[ "${SHARED_WORKDIR:-0}" == 1 && "$WORKDIR" != /* ]]; then
    die "SHARED_WORKDIR=1 needs --workdir (or WORKDIR) set to an absolute path on the shared filesystem" \
        "(got '${WORKDIR}'; the default runs/<method>_<preset> is on each worker's own disk)"
  fi
  if [[ -z "$WORKDIR" ]]; then
    [[ -n "$CONFIG" ]] || die "$COMMAND needs CONFIG (or --workdir)"
    local stem preset; stem="$(basename "${CONFIG%%:*}" .py)"; preset="${CONFIG#*:}"
    [[ "$preset" == "$CONFIG" ]] && preset=default
    WORKDIR="runs/${stem}_${preset}"; [[ -n "$NFS_SHARE" ]] && WORKDIR="/mnt/ssl_jax/$WORKDIR"
  fi
  [[ "$WORKDIR" != gs://* ]] || die "a gs:// workdir is not supported yet (the trainer writes through the" \
    "local filesystem); use a local or NFS workdir and SYNC_TO=$WORKDIR"
  if multi_host && [[ -z "$NFS_SHARE" && "${SHARED_WORKDIR:-0}" != 1 ]]; then
    die "$ACCELERATOR_TYPE has several workers: the workdir must be shared by all of them (set" \
        "NFS_SHARE=IP:/share before install, or mount one yourself and set SHARED_WORKDIR=1)"
  fi
}

cmd_create() {
  local extra=(); [[ "$SPOT" == 1 ]] && extra+=(--spot)
  local create=("${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
                --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"})
  if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${create[@]}"; return; fi
  local out; out="$(mktemp)"
  if "${create[@]}" 2>&1 | tee "$out"; then rm -f "$out"; return; fi
  if grep -qi 'ALREADY_EXISTS\|already exists' "$out"; then
    echo "tpu_vm.sh: TPU $TPU_NAME already exists in $ZONE (its state: gcloud compute tpus tpu-vm describe" \
         "$TPU_NAME --zone=$ZONE). A preempted Spot VM stays until deleted: run \`launch/tpu_vm.sh delete\`," \
         "then \`up\` again with the same SYNC_TO (or NFS workdir) to resume from the newest checkpoint." \
         "To use the existing VM as it is, run \`install\` / \`train\` instead of \`up\`." >&2
  fi
  rm -f "$out"; exit 1
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
    # `&&`, not `;`: after `;` a failed install above would be hidden by the mount's exit status (set -e spares
    # && lists), and up would go on to start trainers that do not exist
    script+=" && sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common && $(nfs_mount)"
    script+=" && { sudo chmod a+rwx /mnt/ssl_jax || true; }"
  fi
  on_workers all "$script"
  run rm -f "$tgz"
}

# Worker 0, before the trainers start (SYNC_TO set): wait for an earlier sync loop, then bind the workdir to
# SYNC_TO as the header says, pulling the bucket's copy into a workdir without checkpoints; exit 1 otherwise.
sync_prepare() {
  local wd url bound; wd="$(q "$WORKDIR")"; url="$(q "$SYNC_TO")"; bound="$wd/.sync_to"
  local s='i=0; while '"$SYNC_ALIVE"' && [ $i -lt '"$STOP_WAIT"' ]; do [ $i = 0 ] &&'
  s+=' echo "waiting (at most '"$STOP_WAIT"' s) for the previous sync loop to finish its push"; sleep 1;'
  s+=' i=$((i + 1)); done'  # one still running then sees the new loop's pid in ~/ssl_jax_sync.pid and exits
  s+='; mkdir -p '"$wd"' || exit 1'
  s+='; if ls '"$wd"'/checkpoints 2>/dev/null | grep -qx "[0-9][0-9]*"; then ckpt=1; else ckpt=0; fi'
  s+='; if [ $ckpt = 1 ] && [ "$(cat '"$bound"' 2>/dev/null)" = '"$url"' ]; then'
  s+=' echo "the workdir has checkpoints and syncs to '"$url"' already: resuming from them, nothing pulled"'
  s+='; else listing=$(gcloud storage ls '"$url"' 2>&1); rc=$?'
  s+='; if [ $rc != 0 ]; then case "$listing" in *"matched no objects"*) rc=empty ;; esac; fi'
  s+='; if [ $rc = empty ]; then echo '"$url"' "is empty: this run starts it"'
  s+='; elif [ $rc != 0 ]; then echo "$listing" >&2; echo "error: cannot list '"$url"' (see above): not starting,'
  s+=' as a run from step 0 would later push over the checkpoints it may hold" >&2; exit 1'
  s+='; elif [ $ckpt = 1 ]; then echo "error: the workdir has checkpoints that did not come from '"$url"','
  s+=' which holds files already: refusing to mix two runs there (use another SYNC_TO or workdir)" >&2; exit 1'
  s+='; else echo "pulling '"$url"' into the workdir"'
  s+='; gcloud storage rsync -r '"$url $wd"' || { echo "error: pulling '"$url"' failed: not starting, as'
  s+=' a run from step 0 would later push over its checkpoints; run train again" >&2; exit 1; }; fi; fi'
  s+='; echo '"$url"' > '"$bound"
  printf '%s' "$s"
}

# Worker 0, after the trainers started: push every SYNC_EVERY s and as soon as the trainer exits (it is
# looked at every 2 s); a loop whose pid is no longer in ~/ssl_jax_sync.pid was replaced and exits quietly.
# The loop (and the gcloud it starts) ignores SIGTERM: a VM shutting down (Spot preemption, maintenance)
# sends SIGTERM to every process, the trainer's included, and the loop must outlive the trainer's save to
# push it. SIGKILL ends it.
sync_loop() {
  local wd url; wd="$(q "$WORKDIR")"; url="$(q "$SYNC_TO")"
  local push='if [ "$(cat '"$wd"'/.sync_to 2>/dev/null)" = '"$url"' ]; then echo "$(date) push";'
  push+=' gcloud storage rsync -r --delete-unmatched-destination-objects '"$wd $url"';'
  push+=' else echo "$(date) not pushing: the workdir is not bound to '"$url"' (see tpu_vm.sh -h)"; fi'
  local s='trap "" TERM; echo $$ > ~/ssl_jax_sync.pid; last=$(date +%s)'
  s+='; mine() { [ "$(cat ~/ssl_jax_sync.pid 2>/dev/null)" = $$ ]; }'
  s+='; while mine && '"$TRAINER_ALIVE"'; do sleep 2'
  s+='; if [ $(($(date +%s) - last)) -ge '"$SYNC_EVERY"' ]; then '"$push"'; last=$(date +%s); fi; done'
  s+='; if mine; then echo "$(date) the trainer exited: final push"; '"$push"'; rm -f ~/ssl_jax_sync.pid; fi'
  printf '%s' "$s"
}

cmd_train() {
  [[ -n "$CONFIG" ]] || die "train needs CONFIG"
  resolve_workdir
  local train=("$VENV_BIN/ssl-jax" train --config "$CONFIG" --workdir "$WORKDIR" --distributed
               ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  local quoted="${train[0]}" w; for w in "${train[@]:1}"; do quoted+=" $(q "$w")"; done
  local setup="cd ~/ssl_jax || exit 1"
  if [[ -n "$NFS_SHARE" ]]; then
    setup="{ $(nfs_mount); } || { echo \"cannot mount the NFS share at /mnt/ssl_jax on \$(hostname)\" >&2;"
    setup+=" exit 1; }; cd ~/ssl_jax || exit 1"
  fi
  setup+="; if $TRAINER_ALIVE; then echo \"a run is already going on \$(hostname)\" >&2; exit 1; fi"
  [[ -z "$SYNC_TO" ]] || on_workers 0 "$setup; $(sync_prepare)"
  on_workers all "$setup; setsid nohup $quoted > $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE"
  if [[ -n "$SYNC_TO" ]]; then
    [[ "${DRY_RUN:-0}" == 1 ]] && echo "# the sync loop, readable: $(sync_loop)"
    # `cd && setsid ... &` would background a subshell that keeps ssh's stdout open until the loop ends
    on_workers 0 "cd ~/ssl_jax || exit 1; setsid nohup bash -c $(q "$(sync_loop)") > ~/ssl_jax_sync.log 2>&1 \
< /dev/null &"
  fi
  [[ "${NO_FOLLOW:-0}" == 1 ]] || cmd_logs
}

cmd_logs() { on_workers "${LOG_WORKER:-0}" "tail -n 200 -F $LOG"; }
# Waits for the trainer (every worker) and the sync loop's final push (worker 0) so that delete is safe.
cmd_stop() {
  local alive="{ $TRAINER_ALIVE || $SYNC_ALIVE; }"
  local s="if $TRAINER_ALIVE; then kill -TERM \"\$(cat $PIDFILE)\" && echo \"SIGTERM sent on \$(hostname)\";"
  s+=" else echo \"no trainer running on \$(hostname)\"; fi"
  s+="; i=0; while $alive && [ \$i -lt $STOP_WAIT ]; do [ \$i = 0 ] && echo \"\$(hostname): waiting (at most"
  s+=" $STOP_WAIT s) for the trainer to save and exit, and for the sync loop's final push if there is one\";"
  s+=" sleep 1; i=\$((i + 1)); done; if $alive; then echo \"\$(hostname): still running after $STOP_WAIT s: see"
  s+=" 'launch/tpu_vm.sh logs' and ~/ssl_jax_sync.log before deleting the VM\" >&2; exit 1; fi"
  s+="; echo \"\$(hostname): stopped\""
  on_workers all "$s"
}
cmd_sync() {
  [[ -n "$SYNC_TO" ]] || die "sync needs SYNC_TO=gs://bucket/path"
  resolve_workdir
  local wd url; wd="$(q "$WORKDIR")"; url="$(q "$SYNC_TO")"
  on_workers 0 "cd ~/ssl_jax && if [ \"\$(cat $wd/.sync_to 2>/dev/null)\" = $url ]; then gcloud storage rsync -r \
$wd $url; else echo 'error: the workdir is not bound to SYNC_TO (train binds it; see tpu_vm.sh -h)' >&2; exit 1; fi"
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
