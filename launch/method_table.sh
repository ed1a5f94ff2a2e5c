#!/usr/bin/env bash
# The method table from one command: trains every method's preset one after another (default `cifar10`:
# ResNet-18, batch 512, 200 epochs), evaluates each finished run (kNN is logged by training itself; the
# linear probe by default), and writes one `ssl-jax report` over all of them: method, kNN, linear, wall
# time, device, and the command behind every number.
#
# Running it again continues where it stopped: an unfinished training resumes from its checkpoint, and a
# training or evaluation that already finished with the same command is not repeated (markers in
# DIR/<run>/method_table/, beside each step's stderr log). A method that fails does not stop the others.
#
# usage: launch/method_table.sh [options] [--config.KEY=VALUE ...]
#
#   --config.KEY=VALUE   overrides for every method, passed through to `ssl-jax train` unchanged
# options:
#   --preset NAME        the preset of every config (default cifar10)
#   --methods LIST       comma-separated config names from configs/ (default: all eight,
#                        simclr,simclr_v2,moco_v1,moco_v2,byol,simsiam,swav,barlow_twins)
#   --protocols LIST     comma-separated `ssl-jax eval` protocols run after training (default linear; any of
#                        knn, linear, linear_full, fewshot, semi1, semi10; "none" for none)
#   --root DIR           run directories DIR/<method>_<preset>, report in DIR/report_<preset> (default runs)
#   --time-limit SECONDS stop once this much time has passed: a training gets SIGTERM (it saves a checkpoint
#                        and exits), an evaluation is cut short (it starts over next time); the report is
#                        still written; exit status 3. Saving and the report take seconds beyond the limit
#   -h, --help           this message
# environment:
#   DRY_RUN=1            print the commands instead of running them
#   SSL_JAX              the ssl-jax command (default: ssl-jax; may be several words, e.g. "python3 -m ssl_jax")
# exit status: 0 every method trained and evaluated; 1 some failed (named at the end); 2 bad arguments;
#   3 the time limit was reached first (run the same command again to continue)
#
# example: launch/method_table.sh --config.data.path=../shared/data/cifar10-jpeg.tar.gz
#          launch/method_table.sh --methods simclr,byol --time-limit 540 --config.data.path=data/c10.tar.gz
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "method_table.sh: error: $*" >&2; echo "run with -h for usage" >&2; exit 2; }
say() { echo "method_table.sh: $*" >&2; }

PRESET=cifar10; METHODS=simclr,simclr_v2,moco_v1,moco_v2,byol,simsiam,swav,barlow_twins; PROTOCOLS=linear; ROOT=runs
TIME_LIMIT=""; OVERRIDES=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --preset|--methods|--protocols|--root|--time-limit)
      (($# >= 2)) || die "$1 needs a value"; set -- "$1=$2" "${@:3}" ;;
    --preset=*) PRESET="${1#*=}"; shift ;;
    --methods=*) METHODS="${1#*=}"; shift ;;
    --protocols=*) PROTOCOLS="${1#*=}"; shift ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --time-limit=*) TIME_LIMIT="${1#*=}"; shift ;;
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --config.*) (($# >= 2)) || die "$1 needs a value"; OVERRIDES+=("$1=$2"); shift 2 ;;
    *) die "unknown argument $1 (overrides are --config.KEY=VALUE)" ;;
  esac
done
[[ -z "$TIME_LIMIT" || "$TIME_LIMIT" =~ ^[1-9][0-9]*$ ]] ||
  die "--time-limit must be a whole number of seconds, got '$TIME_LIMIT'"
[[ -n "$PRESET" ]] || die "--preset is empty"
IFS=, read -ra METHOD_LIST <<< "$METHODS"
((${#METHOD_LIST[@]})) || die "--methods is empty"
SCRIPT_DIR="$(cd "$(dirname "$0")" && pwd)"
for m in "${METHOD_LIST[@]}"; do
  [[ -f "configs/$m.py" ]] || die "no config configs/$m.py (run from the repository root; methods are: $(
    cd "$SCRIPT_DIR/../configs" 2>/dev/null && ls -- *.py | sed 's/\.py$//' | paste -sd, -))"
done
PROTOCOL_LIST=()
if [[ "$PROTOCOLS" != none ]]; then
  IFS=, read -ra PROTOCOL_LIST <<< "$PROTOCOLS"
  for p in ${PROTOCOL_LIST[@]+"${PROTOCOL_LIST[@]}"}; do
    case "$p" in knn|linear|linear_full|fewshot|semi1|semi10) ;; *) die "unknown protocol '$p'" ;; esac
  done
fi
if [[ -n "$TIME_LIMIT" ]] && ! command -v timeout > /dev/null; then die "--time-limit needs GNU timeout (coreutils)"; fi
read -ra SSL_JAX_CMD <<< "${SSL_JAX:-ssl-jax}"
DRY="${DRY_RUN:-0}"
START=$SECONDS

# A SIGTERM/SIGINT to this script (Ctrl-C, a VM shutting down) goes on to the running step as SIGTERM: a
# training saves a checkpoint and exits; then this script stops (exit 130) without marking anything done.
child=0; stopping=0
on_signal() { stopping=1; ((child)) && kill -TERM "$child" 2>/dev/null || true; }
trap on_signal TERM INT

# What a marker holds: the command's arguments after the executable, so that `ssl-jax` and
# `python3 -m ssl_jax` count as the same command.
key() { printf '%q ' "${@:$((${#SSL_JAX_CMD[@]} + 1))}"; }

# Runs one step ("train" or "eval_<protocol>") of a run unless its marker says it already finished with the
# same command. Returns 0 done, 1 failed, 3 out of time.
step() {
  local dir="$1" name="$2"; shift 2
  local marker="$dir/method_table/$name.done" want
  want="$(key "$@")"
  if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then say "$name in $dir: done before, skipped"; return 0; fi
  if [[ "$DRY" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; return 0; fi
  # A signal that came between two steps (after the trainer had exited): no new step, which nobody would stop
  if ((stopping)); then say "stopped by a signal before $name in $dir"; exit 130; fi
  local limit=() rc=0
  if [[ -n "$TIME_LIMIT" ]]; then
    local left=$((TIME_LIMIT - (SECONDS - START)))
    ((left > 0)) || return 3
    limit=(timeout -s TERM --kill-after=300 "$left")
  fi
  say "$name in $dir: $*"
  mkdir -p "$dir/method_table"
  local log="$dir/method_table/$name.log" mark
  mark=$( { wc -c < "$log"; } 2>/dev/null || echo 0)
  # tee ignores SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and a tee killed by it would leave
  # the trainer writing its "saving" lines into a closed pipe (it then dies before saving)
  ${limit[@]+"${limit[@]}"} "$@" 2> >(trap '' INT TERM; exec tee -a "$log" >&2) &
  child=$!
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done  # wait again after a trap
  child=0
  if ((stopping)); then say "stopped by a signal during $name in $dir (exit $rc); nothing marked done"; exit 130; fi
  if ((rc == 124)); then return 3; fi
  if ((rc)); then say "$name in $dir failed with exit $rc (its output: $log)"; return 1; fi
  # A trainer sent SIGTERM by someone else saves and exits 0 too: its "stop requested" line tells the two
  # apart (tee may still be writing the last lines: look twice). grep -c, not -q: -q stops reading at the
  # match, and a tail still writing then dies of SIGPIPE, which pipefail makes the pipeline's status.
  stopped() { tail -c +"$((mark + 1))" "$log" | grep -c "stop requested (" > /dev/null; }
  if stopped || { sleep 1; stopped; }; then
    say "$name in $dir was stopped before its end; run again to continue"; return 1
  fi
  printf '%s' "$want" > "$marker.tmp" && mv "$marker.tmp" "$marker"
}

FAILED=(); DIRS=(); OUT_OF_TIME=0
for m in "${METHOD_LIST[@]}"; do
  dir="$ROOT/${m}_$PRESET"
  DIRS+=("$dir")
  ((OUT_OF_TIME)) && continue
  train=("${SSL_JAX_CMD[@]}" train --config "configs/$m.py:$PRESET" --workdir "$dir" --no-progress
         ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  # Evaluations count only for the training they followed: a training to be (re)run invalidates them.
  if [[ "$DRY" != 1 && "$(cat "$dir/method_table/train.done" 2>/dev/null)" != "$(key "${train[@]}")" ]]; then
    rm -f "$dir"/method_table/eval_*.done
  fi
  rc=0; step "$dir" train "${train[@]}" || rc=$?
  if ((rc == 3)); then OUT_OF_TIME=1; continue; fi
  if ((rc)); then FAILED+=("$m (train)"); continue; fi
  for p in ${PROTOCOL_LIST[@]+"${PROTOCOL_LIST[@]}"}; do
    rc=0; step "$dir" "eval_$p" "${SSL_JAX_CMD[@]}" eval --workdir "$dir" --protocol "$p" --no-progress || rc=$?
    if ((rc == 3)); then OUT_OF_TIME=1; break; fi
    if ((rc)); then FAILED+=("$m (eval $p)"); fi
  done
done

REPORT_DIRS=()
for dir in "${DIRS[@]}"; do [[ "$DRY" == 1 || -f "$dir/config.json" ]] && REPORT_DIRS+=("$dir"); done
if ((${#REPORT_DIRS[@]})); then
  report=("${SSL_JAX_CMD[@]}" report --workdir "${REPORT_DIRS[@]}" --out "$ROOT/report_$PRESET")
  if [[ "$DRY" == 1 ]]; then printf '+'; printf ' %q' "${report[@]}"; printf '\n'
  elif "${report[@]}" > /dev/null; then say "report: $ROOT/report_$PRESET/report.md"
  else FAILED+=("report")
  fi
fi
if ((${#FAILED[@]})); then say "failed: ${FAILED[*]}"; fi
if ((OUT_OF_TIME)); then say "time limit of ${TIME_LIMIT}s reached; run the same command again to continue"; exit 3; fi
((${#FAILED[@]} == 0)) || exit 1
