#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md and the README, in priority order, inside one time budget. Made for
# the device machine, where one command may run 10 minutes and the machine stays warm only briefly between
# calls: the same command, given again while the machine is warm, goes on with the steps not yet done
# (markers in runs/device_session/), and a 200-epoch training cut by the budget resumes from its checkpoint.
#
# usage: benchmarks/device_session.sh SECONDS [STEP ...]
#   SECONDS  the budget of this call; a step starts only if its minimum fits in what is left
#   STEP     the steps to consider, in order (default: the ones not yet measured, TODO below; ALL lists
#            every step)
# environment:
#   PRESET_R18 (default cifar10), PRESET_R50 (default imagenet), DATA (default .data/cifar10-jpeg.tar.gz),
#   SSL_JAX (default "python3 -m ssl_jax"), EXTRA (overrides appended to every bench and training command),
#   R50_BATCHES (default "512": the batches tried, in this order until one fails, so the last row printed is
#   the largest that ran; on 2026-11-23 SimCLR compiled in 64 s at 512, 205 s at 1024 and had not finished
#   compiling 2048 after 250 s, so larger batches are worth their device time only on a long call;
#   BENCHMARKS.md says why 4096 needs gradient accumulation; the ResNet-50 steps let JAX take 94% of the
#   device memory, XLA_PYTHON_CLIENT_MEM_FRACTION=0.94, instead of 75%),
#   R50_REMAT (default true: the ResNet-50 rows' config.model.remat; step bench_r50_simclr_noremat sets false),
#   R50_POLICY (default: the config's, "block"; step bench_r50_simclr_remat_convs sets "convs", which keeps the
#   convolutions' outputs and recomputes only BatchNorm and ReLU),
#   JPEG_NUM (default 8192: generated 500 x 375 JPEGs for the streamed ResNet-50 step).
# Each step's stdout and stderr go to runs/device_session/STEP.out / STEP.err, one line per step to
# runs/device_session/log; `collect OUTDIR` packs them and the trained runs' records into OUTDIR/results.tgz.
set -uo pipefail

RES=runs/device_session
PY=${SSL_JAX:-python3 -m ssl_jax}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
P18=${PRESET_R18:-cifar10}
P50=${PRESET_R50:-imagenet}
read -ra X <<< "${EXTRA:-}"
read -ra R50B <<< "${R50_BATCHES:-512}"
# ResNet-50 rows: synthetic 256 px images held on the device, so that all three ways run
# The SimCLR cifar10 preset's recipe details before 2026-11-23 (10 warm-up epochs, no weight decay on biases
# and BatchNorm, zero-init residual BatchNorm, torchvision's convolution init, lr set every step, a BatchNorm
# head, BatchNorm statistics over both views): the 50-epoch experiment's baseline, in ours and in PyTorch
BN_HEAD_JOINT=(--config.head.use_bn=true --config.simclr.bn_per_view=false)
EARLIER=(--config.model.zero_init_residual=true --config.optim.warmup_epochs=10
         --config.optim.exclude_bias_and_norm=true --config.model.conv_init=torchvision
         --config.optim.schedule_per_epoch=false "${BN_HEAD_JOINT[@]}")
R50_DATA=(--config.data.name=synthetic --config.data.num_classes=1000 --config.data.resident=true)
# the ResNet-50 SimCLR bench with 94% of the device memory for JAX; each step adds its data and batch
read -ra PY_WORDS <<< "$PY"
R50_SIMCLR=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 "${PY_WORDS[@]}" bench --config "configs/simclr.py:$P50")
mkdir -p "$RES"

if [[ "${1:-}" == _bench_r50 ]]; then  # batches in the order of R50_BATCHES until one fails; 0 if any ran
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
  ran=1
  for b in "${R50B[@]}"; do
    $PY bench --config "configs/$2.py:$P50" "${R50_DATA[@]}" --config.data.num_examples=2048 \
      --config.batch_size="$b" --config.model.remat="${R50_REMAT:-true}" \
      ${R50_POLICY:+"--config.model.remat_policy=$R50_POLICY"} --steps 20 --no-progress ${X[@]+"${X[@]}"} ||
      { echo "device_session: batch $b did not run" >&2; break; }
    ran=0
  done
  exit $ran
fi

if [[ "${1:-}" == collect ]]; then
  out=${2:?collect needs OUTDIR}
  files=("$RES")
  for d in runs/*_"$P18"; do
    [[ -d "$d" ]] || continue
    for f in config.json metrics.jsonl runs.jsonl method_table subsets report.md knn_top1.png loss.png lr.png; do
      [[ -e "$d/$f" ]] && files+=("$d/$f")
    done
  done
  # the profile's summary is in its step's output; its trace.json.gz is the timeline; the xplane.pb is large
  tar czf "$out/results.tgz" --exclude='*.xplane.pb' "${files[@]}"
  exit 0
fi

BUDGET=${1:?usage: device_session.sh SECONDS [STEP ...]}; shift
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }

R18_METHODS=(moco_v2 byol simsiam swav barlow_twins)
# Every step, in the order of the first GPU session (2026-11-23), which did the first two calls' worth.
ALL=(bench_r18_simclr table_simclr)
for m in "${R18_METHODS[@]}"; do ALL+=("bench_r18_$m"); done
ALL+=(bench_r50_simclr bench_r50_simclr_noremat bench_r50_simclr_remat_convs profile_r50_simclr
      bench_r50_simclr_b4096 bench_jpeg_r50_simclr)
for m in "${R18_METHODS[@]}"; do ALL+=("bench_r50_$m"); done
ALL+=(bench_r18_simclr_torch_compile simclr_e50_ours simclr_e50_torch simclr_e50_knn_f32 simclr_e50_ours_lightly
      simclr_e50_ours_f32)
for m in simsiam byol moco_v2 swav barlow_twins simclr_v2 moco_v1; do ALL+=("table_$m"); done
# The default: what is not measured yet, most wanted first (the second GPU session, 2026-11-23, measured the
# SimCLR 50-epoch experiment, SimSiam's 200 epochs, ResNet-50 SimCLR at 512 and 1024, MoCo v2 at 512 and the
# torch.compile row). First the SimCLR cifar10 preset's 200 epochs with lightly's recipe details, its
# default since that session (the issue's kNN target; about 6.5 min), then its ResNet-18 speed row again
# (since that session the preset also has lightly's head without BatchNorm and BatchNorm statistics per
# view, so the row measured then is not the preset's any more) and the rows of BYOL, SimSiam and Barlow
# Twins (one pass over both views since then, where they made one per view), then ResNet-50 without
# rematerialisation and with the cheaper remat policy, a profile of its step (where the time goes below the
# 3,500 img/s bar), batch 4096 and the JPEG step, the other methods'
# ResNet-50 rows, and the other methods' 200-epoch runs (about 5 to 9 minutes each on the H100: one per call;
# SimSiam's again, its preset having since taken lightly's details: README, "Methods and results").
TODO=(table_simclr bench_r18_simclr bench_r18_byol bench_r18_simsiam bench_r18_barlow_twins
      bench_r50_simclr_noremat bench_r50_simclr_remat_convs profile_r50_simclr bench_r50_simclr_b4096
      bench_jpeg_r50_simclr)
for m in byol simsiam swav barlow_twins; do TODO+=("bench_r50_$m"); done
for m in byol moco_v2 swav barlow_twins simsiam simclr_v2 moco_v1; do TODO+=("table_$m"); done
(($#)) && STEPS=("$@") || STEPS=("${TODO[@]}")

# name, the least seconds worth starting it with, command
run_step() {
  local name=$1 need=$2; shift 2
  if [[ -e "$RES/$name.done" ]]; then return 0; fi
  local t=$(( $(left) ))
  if ((t < need)); then
    echo "device_session: $name skipped: ${t}s left, it needs ${need}s" | tee -a "$RES/log"
    return 0
  fi
  echo "device_session: $name started $(date -u +%FT%TZ) with ${t}s left" | tee -a "$RES/log"
  local t0=$SECONDS rc=0
  timeout -s TERM -k 15 "$((t - 5))" "$@" >> "$RES/$name.out" 2>> "$RES/$name.err" || rc=$?
  echo "device_session: $name exit $rc after $((SECONDS - t0))s" | tee -a "$RES/log"
  if ((rc == 0)); then touch "$RES/$name.done"; fi
}

for s in "${STEPS[@]}"; do
  case "$s" in
    bench_r18_simclr)
      run_step "$s" 120 $PY bench --config "configs/simclr.py:$P18" --config.data.path="$DATA" --steps 100 --torch \
        --no-progress ${X[@]+"${X[@]}"} ;;
    bench_r18_simclr_torch_compile)
      run_step "$s" 150 $PY bench --config "configs/simclr.py:$P18" --config.data.path="$DATA" --steps 100 --torch \
        --torch-compile --modes synthetic --no-progress ${X[@]+"${X[@]}"} ;;
    table_*)
      # method_table.sh keeps its own time: it stops the training cleanly (checkpoint) and exits 3.
      m=${s#table_}; protocols=linear; [[ $m == simclr ]] && protocols=linear,linear_full,semi1,semi10
      run_step "$s" 80 env SSL_JAX="$PY" launch/method_table.sh --methods "$m" --preset "$P18" \
        --protocols "$protocols" --time-limit "$(( $(left) - 20 ))" --config.data.path="$DATA" ${X[@]+"${X[@]}"} ;;
    simclr_e50_ours*)
      # the variants switch the recipe details in which lightly's benchmark differs from our preset, or bf16
      case "$s" in
        simclr_e50_ours) variant=("${EARLIER[@]}") ;;
        simclr_e50_ours_lightly) variant=(--config.model.zero_init_residual=false --config.optim.warmup_epochs=0
                                          --config.optim.exclude_bias_and_norm=false
                                          --config.model.conv_init=torchvision
                                          --config.optim.schedule_per_epoch=false "${BN_HEAD_JOINT[@]}") ;;
        simclr_e50_ours_f32) variant=("${EARLIER[@]}" --config.model.dtype=float32) ;;
        *) echo "device_session: unknown step $s (steps: ${ALL[*]})" >&2; exit 2 ;;
      esac
      run_step "$s" 150 $PY train --config "configs/simclr.py:$P18" --workdir "runs/${s}_$P18" \
        --config.num_epochs=50 --config.data.path="$DATA" --no-progress ${variant[@]+"${variant[@]}"} \
        ${X[@]+"${X[@]}"} ;;
    simclr_e50_knn_f32)  # the bf16-trained run's kNN again, features computed in float32
      if [[ -d "runs/simclr_e50_ours_$P18" ]]; then
        run_step "$s" 30 $PY eval --workdir "runs/simclr_e50_ours_$P18" --protocol knn --config.model.dtype=float32 \
          --no-progress
      fi ;;
    simclr_e50_torch)
      run_step "$s" 520 python3 benchmarks/torch_simclr_reference.py --out "$RES/simclr_e50_torch.jsonl" \
        --epochs 50 --archive "$DATA" "${EARLIER[@]}" ${X[@]+"${X[@]}"} ;;
    bench_r18_*)
      run_step "$s" 60 $PY bench --config "configs/${s#bench_r18_}.py:$P18" --config.data.path="$DATA" \
        --steps 100 --no-progress ${X[@]+"${X[@]}"} ;;
    bench_r50_simclr_b4096)  # the issue's batch on one GPU: two chunks of 2048 (gradient accumulation) and remat
      run_step "$s" 90 "${R50_SIMCLR[@]}" "${R50_DATA[@]}" --config.data.num_examples=4096 --config.batch_size=4096 \
        --config.grad_accum_steps=2 --config.model.remat=true --modes synthetic --steps 5 --warmup 1 \
        --no-progress ${X[@]+"${X[@]}"} ;;
    profile_r50_simclr)  # the batch-512 remat step of the table, 3 steps traced: busy time, kinds of work, top ops
      run_step "$s" 120 "${R50_SIMCLR[@]}" "${R50_DATA[@]}" --config.data.num_examples=2048 --config.batch_size=512 \
        --config.model.remat=true --modes synthetic --steps 10 --profile "$RES/$s" --profile-steps 3 \
        --no-progress ${X[@]+"${X[@]}"} ;;
    bench_r50_simclr_noremat)  # remat recomputes the forward: what it costs where the batch fits without it
      run_step "$s" 90 env R50_REMAT=false "$0" _bench_r50 simclr ;;
    bench_r50_simclr_remat_convs)  # remat that keeps the convolutions' outputs: memory and speed
      run_step "$s" 90 env R50_POLICY=convs "$0" _bench_r50 simclr ;;
    bench_r50_*)
      run_step "$s" 90 "$0" _bench_r50 "${s#bench_r50_}" ;;
    bench_jpeg_r50_simclr)
      if [[ ! -e "$RES/$s.done" ]] && (( $(left) >= 150 )); then
        [[ -d .jpeg ]] ||
          python3 -c "from ssl_jax.data import bench_jpeg; bench_jpeg.write_jpegs('.jpeg', ${JPEG_NUM:-8192}, 500, 375)"
      fi
      # the largest ResNet-50 batch that ran
      b=$(grep -o '"batch_size": [0-9]*' "$RES/bench_r50_simclr.out" 2>/dev/null | grep -o '[0-9]*$' | sort -n |
          tail -1)
      run_step "$s" 90 "${R50_SIMCLR[@]}" --config.data.path=.jpeg --config.data.stream=true \
        --config.batch_size="${b:-1024}" --config.model.remat=true --modes synthetic,host --steps 20 \
        --no-progress ${X[@]+"${X[@]}"} ;;
    *) echo "device_session: unknown step $s (steps: ${ALL[*]})" >&2; exit 2 ;;
  esac
done
done_count=$(find "$RES" -name '*.done' | wc -l)
echo "device_session: $done_count steps done on this machine (${#TODO[@]} to do, ${#ALL[@]} in all)" | tee -a "$RES/log"
