#!/usr/bin/env bash
# CIFAR-10 on one GPU inside a wall-clock budget (DEADLINE: epoch seconds; default now + BUDGET_S):
#   bench   GPU timings: synthetic per-image gates (timm-skipnet bench: SkipNet-38/110 at 32 px, SkipNet-101 at
#           224 px, training steps) and the published SkipNet-38 on the 10,000 test images (fp32 and bf16)
#   r38     the rl and ft steps of examples/cifar10_skipnet38.sh (R38_STEPS), one process per alpha in R38_ALPHAS,
#           in the background; they need the finished $RUNS/c10_r38_dp (backbone) and c10_r38_dp_swa (teacher)
#   r110    SkipNet-110 sized to what is left of the budget: a gates-open trunk of E1 epochs, then side by side its
#           same-budget ResNet-110 (gates open, E2 more epochs) and rl for each alpha in R110_ALPHAS (E2 epochs).
#           E1 and E2 come from a 40-update probe of the trunk's throughput under the load of the r38 runs, and
#           are kept in $RUNS/c10_r110_plan: a later call with the same $RUNS resumes that schedule
# Every run checkpoints each epoch and resumes where it stopped; a run the deadline cuts short stays unfinished.
#   CIFAR10_DIR=... RUNS=runs BUDGET_S=450 bash examples/cifar10_gpu.sh [bench] [r38] [r110]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CIFAR10_DIR:-../shared/data/cifar10/plain}
RUNS=${RUNS:-runs}
PY=${PYTHON:-.venv/bin/python}
DEADLINE=${DEADLINE:-$(( $(date +%s) + ${BUDGET_S:-450} ))}
left() { echo $(( DEADLINE - $(date +%s) )); }
log() { echo "[cifar10_gpu $(date -u +%T), $(left) s left] $*"; }

run() {  # run <name> <args...>: as in cifar10_skipnet38.sh, but never past the deadline
  local name=$1; shift
  local out="$RUNS/$name"
  if [ -f "$out/model/model.safetensors" ]; then log "[$name] done"; return; fi
  if (( $(left) < 20 )); then log "[$name] not started: the deadline is near"; return; fi
  local resume=()
  [ -f "$out/checkpoints/latest" ] && resume=(--resume "$out")
  mkdir -p "$out"
  echo "[$name] $(date -u +%FT%TZ) start ${resume[*]:-fresh} on $(nvidia-smi --query-gpu=name --format=csv,noheader \
       2>/dev/null || echo cpu)" >> "$out/wall_time.log"
  timeout "$(left)" "$PY" examples/finetune.py --dataset "$DATA" --seed 0 --output "$out" "${resume[@]}" "$@" \
    || { log "[$name] stopped ($?)"; return 0; }
  echo "[$name] $(date -u +%FT%TZ) end" >> "$out/wall_time.log"
}

bench() {
  local cli=("$PY" -m timm_skipnet.cli bench --device cuda --min-time 1)
  "${cli[@]}" --model skipnet_resnet38_cifar --img-size 32 --batch-sizes 1 256 --rate 0.67
  "${cli[@]}" --model skipnet_resnet110_cifar --img-size 32 --batch-sizes 1 256 --rate 0.5
  "${cli[@]}" --model skipnet_resnet101 --img-size 224 --batch-sizes 1 64 --rate 0.5
  "${cli[@]}" --model skipnet_resnet38_cifar --train --batch-sizes 128
  "$PY" examples/cifar10_speed.py --device cuda --data "$DATA"
  "$PY" examples/cifar10_speed.py --device cuda --data "$DATA" --amp bf16
}

r38() {
  for alpha in ${R38_ALPHAS:-0.68 0.72}; do
    # shellcheck disable=SC2086
    ALPHA=$alpha CIFAR10_DIR="$DATA" RUNS="$RUNS" PYTHON="$PY" TRAIN_EXTRA="--workers ${R38_WORKERS:-3}" \
      timeout "$(left)" bash examples/cifar10_skipnet38.sh ${R38_STEPS:-rl ft} > "$RUNS/r38_a$alpha.log" 2>&1 &
  done
}

r110() {
  # shellcheck disable=SC2206
  local common=(--model skipnet_resnet110_cifar --batch-size 256 --checkpoint-every 196 --log-every 20 --amp bf16
                --workers "${R110_WORKERS:-6}" ${R110_EXTRA:-})
  local alphas=(${R110_ALPHAS:-0.5 0.7})
  local e1 e2 plan="$RUNS/c10_r110_plan"
  if [ -f "$plan" ]; then
    # a later call resumes the planned schedule: a cosine run refuses to resume under another --epochs
    read -r e1 e2 < "$plan"
    log "r110: resuming the plan of an earlier call: trunk $e1 epochs, then $e2"
  else
    rm -rf "$RUNS/c10_r110_probe"
    run c10_r110_probe "${common[@]}" --stage base --steps "${PROBE_STEPS:-40}" --lr 0.1 --eval-num-samples 256 \
        --no-export
    local epoch_s
    # the probe's images/s plus EPOCH_OVERHEAD_S per epoch (loader workers restarted, shuffle buffer refilled): on
    # an H200 the probe said 10.9 s per epoch and the 20-epoch trunk took 17.9
    epoch_s=$("$PY" -c "import json, sys; print(float(sys.argv[2]) / json.loads(open(sys.argv[1]).readlines()[-1])[
              'img_per_s'] + float(sys.argv[3]))" "$RUNS/c10_r110_probe/log.jsonl" "${EPOCH_IMAGES:-50000}" \
              "${EPOCH_OVERHEAD_S:-7}")
    # trunk E1 epochs, then 1 + len(alphas) runs side by side for E2 = E1 / 4 epochs (each about 1 + 0.6 per extra
    # run slower: three such runs on an H200 did 7.8 updates/s each against 17 alone); 90 s for start-ups,
    # evaluations and exports
    e1=$("$PY" -c "import sys; t, s, n = map(float, sys.argv[1:]); print(int((t - 90) / (s * (1 + (1 + .6 * n) / 4))))" \
         "$(left)" "$epoch_s" "${#alphas[@]}")
    e2=$(( e1 / 4 ))
    log "r110: probe $epoch_s s/epoch -> trunk $e1 epochs, then $e2 epochs for the baseline and rl ${alphas[*]}"
    if (( e1 < 12 )); then
      log "r110: too little time left for a meaningful trunk (and 3 epochs after it); skipped"; return
    fi
    echo "$e1 $e2" > "$plan"
  fi
  run c10_r110_base "${common[@]}" --stage base --epochs "$e1" --lr 0.2 --weight-decay 5e-4 --sched cosine \
      --warmup-epochs 1
  if [ ! -f "$RUNS/c10_r110_base/model/model.safetensors" ]; then
    log "r110: the trunk did not finish before the deadline; the next call resumes it ($plan)"; return
  fi
  local pids=()
  run c10_r110_base_ft "${common[@]}" --stage base --initial-checkpoint "$RUNS/c10_r110_base/model" --epochs "$e2" \
      --lr 0.02 --weight-decay 1e-4 --sched cosine &
  pids+=($!)
  for alpha in "${alphas[@]}"; do
    run "c10_r110_rl_a$alpha" "${common[@]}" --stage rl --initial-checkpoint "$RUNS/c10_r110_base/model" \
        --epochs "$e2" --lr 0.02 --weight-decay 1e-4 --sched cosine --reset-gates --gate-init-bias 0 \
        --rl-baseline batch_mean --alpha "$alpha" --rl-warmup-epochs $(( e2 * 3 / 10 )) &
    pids+=($!)
  done
  wait "${pids[@]}"
}

mkdir -p "$RUNS"
stages=("$@")
(( ${#stages[@]} )) || stages=(bench r38 r110)
for stage in "${stages[@]}"; do
  case $stage in
    bench) log bench; bench || log "bench failed ($?)" ;;
    r38) log r38; r38 ;;
    r110) log r110; r110 || log "r110 failed ($?)" ;;
    *) echo "unknown stage '$stage' (bench | r38 | r110)" >&2; exit 2 ;;
  esac
done
wait
log done
