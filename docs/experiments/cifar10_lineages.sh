#!/usr/bin/env bash
# Every CIFAR-10 SkipNet-38 lineage trained on the way to the shipped model, as it was run (the history behind
# docs/experiments/cifar10.md; results in examples/cifar10_runs.json). The shipped model's own recipe is
# examples/cifar10_skipnet38.sh: its steps train the same runs as this script's stages dp_all and dp_swa_ext.
# The 50-epoch family (stage all):
#   base     50 epochs, gates open            -> the ResNet-38 backbone
#   base_ft  +10 epochs, gates open           -> the same-budget ResNet-38 baseline (what SkipNet is compared with)
#   rl_a*    +10 epochs of hybrid RL per alpha, fresh gates at p = 0.5 so the backbone learns to run with blocks
#            missing while the policy learns which ones it can drop
#   sp       (optional, not in "all") straight-through sp from base; it keeps every gate open (see cifar10.md)
# The long family (stages long_all = long, long_ft, long_rl), bf16 autocast:
#   long              +40 epochs warm restart of base         -> the 90-epoch backbone
#   long_base_ft      +15 epochs, gates open                  -> its same-budget ResNet-38 baseline
#   long_rl_a* / long_ft_a*  +10 epochs rl, then +5 epochs ft (frozen greedy gates, backbone fine-tuned)
# The long2 family (stages long2, then long2_all = long2_base_ft + long2_rl; long2_ft is the no-distillation ablation):
#   long2             +50 epochs second warm restart of long, label smoothing 0.1  -> the 140-epoch backbone
#   long2_base_ft     +15 epochs, gates open                  -> its same-budget ResNet-38 baseline
#   long2_rl_a* / long2_kd_a*  +10 epochs rl, then +5 epochs ft distilled from the 140-epoch backbone
#   long2_swa (swa, swa25, kdswa_a*)  SWA weight averaging of both sides at 165 epochs; long2_swa_ext: at 175;
#   long2_kdswawd: kdswa with the ResNet-38's SWA weight decay; long2_kdswat25: kdswa with the 90.67 % teacher
#   long2_rlswa       rl_a* then kdswa_a* directly (default alphas 0.66 0.67), after long2 and long2_swa
#   long2_ent         the same with an entropy bonus in rl: rlent_a*, then kdswaent_a*
#   thr               a per-image gate by threshold on the published model, then 10 epochs of self-distilled SWA ft
#   thr_cos           the same gate, then 5 epochs of self-distilled ft at a small cosine lr
# The dp family (stage dp_all; resumable, about 4 h of CPU in all), one fresh lineage at a 125-epoch budget:
#   dp                100 epochs from scratch, one cosine schedule, label smoothing 0.1, stochastic depth 0.1
#                     (drop path): a backbone that has learnt to lose blocks
#   dp_swa(25)        SWA gates open for 15 / 25 epochs: the teacher / the same-budget ResNet-38 baseline (125)
#   dp_rl_a* / dp_kdswa_a*  rl 10 epochs, then the SWA ft distilled from dp_swa, 15 epochs (125)
#   dp_kdrl (stage)   dp_kdrl_a* / dp_kdrlswa_a*: the same with the rl stage distilled from dp_swa too
#   dp_seed (stage)   dp_kdswaseed<SEED>_a*: dp_kdswa again with another seed (SEED, default 1), its noise
#   dp_nodp (stage)   dp_kdswanodp_a*: dp_kdswa with the ft's stochastic depth off
#   dp_swa_ext        both sides averaged 10 epochs longer (135): dp_kdswa25_a* and dp_swa35
#   dp_seed_ext, dp_nodp_ext  the same for dp_seed and dp_nodp: dp_kdswa25seed<SEED>_a*, dp_kdswa25nodp_a*
# The long3 family (stages long3, then long3_all = long3_base_ft + long3_rl):
#   long3             +50 epochs third warm restart of long2, label smoothing 0.1  -> the 190-epoch backbone
#   long3_base_ft     +15 epochs, gates open, label smoothing 0.1  -> its same-budget ResNet-38 baseline
#   long3_rl_a* / long3_kd_a*  +10 epochs rl, then +5 epochs ft distilled from the 190-epoch backbone
# Every stage checkpoints each epoch and this script resumes where it stopped: re-run it after an interruption.
#   CIFAR10_DIR=../shared/data/cifar10/plain bash docs/experiments/cifar10_lineages.sh [base|base_ft|rl|sp|ft|all|long_all|...]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${CIFAR10_DIR:-../shared/data/cifar10/plain}
RUNS=${RUNS:-runs}
PY=${PYTHON:-.venv/bin/python}
# TRAIN_EXTRA: extra trainer flags for this machine (e.g. "--workers 4" on a GPU host); none change the recipe
# shellcheck disable=SC2206
COMMON=(--model skipnet_resnet38_cifar --dataset "$DATA" --batch-size 128 --checkpoint-every 390 --log-every 50 --seed 0
        ${TRAIN_EXTRA:-})
FINETUNE=(--initial-checkpoint "$RUNS/c10_r38_base/model" --epochs 10 --lr 0.01 --weight-decay 1e-4 --sched cosine)

run() {  # run <name> <args...>: skip when finished, resume when a checkpoint exists
  local name=$1; shift
  local out="$RUNS/$name"
  if [ -f "$out/model/model.safetensors" ]; then echo "[$name] done"; return; fi
  local resume=()
  [ -f "$out/checkpoints/latest" ] && resume=(--resume "$out")
  mkdir -p "$out"
  echo "[$name] $(date -u +%FT%TZ) start ${resume[*]:-fresh}" >> "$out/wall_time.log"
  "$PY" examples/finetune.py "${COMMON[@]}" --output "$out" "${resume[@]}" "$@"
  echo "[$name] $(date -u +%FT%TZ) end" >> "$out/wall_time.log"
}

extend() {  # extend <short> <long>: start run c10_r38_<long> from the last checkpoint of the finished c10_r38_<short>
  local src="$RUNS/c10_r38_$1" dst="$RUNS/c10_r38_$2"
  [ -e "$dst/checkpoints/latest" ] && return
  local last; last=$(cat "$src/checkpoints/latest")
  mkdir -p "$dst/checkpoints.tmp"
  cp -r "$src/checkpoints/$last" "$dst/checkpoints.tmp/"
  echo "$last" > "$dst/checkpoints.tmp/latest"
  cp "$src/log.jsonl" "$src/wall_time.log" "$dst/"
  mv "$dst/checkpoints.tmp" "$dst/checkpoints"
}

# weight averaging (SWA: --model-ema with decay 1 and warm-up power 1 = the plain mean of every update's weights)
SWA=(--sched none --lr 0.01 --epochs 15 --model-ema --model-ema-decay 1 --model-ema-warmup --model-ema-warmup-power 1
     --eval-every-epochs 5 --amp bf16)

long2_rl() {  # long2_rl <alpha> [<kind> <extra flags...>]: rl from the 140-epoch backbone, fresh gates at p = 0.5,
  # 3-epoch REINFORCE warm-up; writes c10_r38_long2_<kind>_a<alpha> (kind: rl)
  local alpha=$1 kind=${2:-rl}; shift; (( $# )) && shift
  run "c10_r38_long2_${kind}_a$alpha" --stage rl --initial-checkpoint "$RUNS/c10_r38_long2/model" --epochs 10 \
      --lr 0.01 --weight-decay 1e-4 --sched cosine --reset-gates --gate-init-bias 0 --rl-baseline batch_mean \
      --alpha "$alpha" --rl-warmup-epochs 3 --eval-every-epochs 5 --amp bf16 "$@"
}

long2_kdswa() {  # long2_kdswa <alpha> [<rl kind> <kind>]: 15 epochs of ft distilled from long2_swa, averaged by SWA,
  # from c10_r38_long2_<rl kind>_a<alpha>; writes c10_r38_long2_<kind>_a<alpha> (kinds: rl, kdswa)
  run "c10_r38_long2_${3:-kdswa}_a$1" --stage ft --initial-checkpoint "$RUNS/c10_r38_long2_${2:-rl}_a$1/model" \
      --distill-from "$RUNS/c10_r38_long2_swa/model" --distill-weight 0.7 --distill-temperature 1 \
      --weight-decay 1e-4 "${SWA[@]}"
}

stage=${1:-all}
if [[ $stage == base || $stage == all ]]; then
  run c10_r38_base --stage base --epochs 50 --lr 0.1 --weight-decay 5e-4 --sched cosine --warmup-epochs 1 \
      --eval-every-epochs 10
fi
if [[ $stage == long || $stage == long_all ]]; then
  # a warm restart (SGDR) of the 50-epoch base for 40 more epochs: the 90-epoch backbone for the >= 90 % baseline;
  # bf16 autocast trains 1.6x faster on this CPU (avx512_bf16)
  run c10_r38_long --stage base --initial-checkpoint "$RUNS/c10_r38_base/model" --epochs 40 --lr 0.05 \
      --weight-decay 5e-4 --sched cosine --warmup-epochs 1 --eval-every-epochs 10 --amp bf16
fi
if [[ $stage == long2 || $stage == long2_all ]]; then
  # a second, longer warm restart of the 90-epoch backbone (+50 epochs, label smoothing 0.1): the 140-epoch backbone
  run c10_r38_long2 --stage base --initial-checkpoint "$RUNS/c10_r38_long/model" --epochs 50 --lr 0.05 \
      --weight-decay 5e-4 --sched cosine --warmup-epochs 1 --smoothing 0.1 --eval-every-epochs 10 --amp bf16
fi
if [[ $stage == long2_base_ft || $stage == long2_all ]]; then  # the same-budget baseline of the long2 family
  run c10_r38_long2_base_ft --stage base --initial-checkpoint "$RUNS/c10_r38_long2/model" --epochs 15 --lr 0.01 \
      --weight-decay 1e-4 --sched cosine --amp bf16
fi
if [[ $stage == long2_base_ft_ls ]]; then  # (ablation, 89.56 %) the baseline fine-tune keeping label smoothing 0.1: without
  # it long2_base_ft overfitted (train loss 0.02) and fell from 89.86 to 89.39 %
  run c10_r38_long2_base_ft_ls --stage base --initial-checkpoint "$RUNS/c10_r38_long2/model" --epochs 15 --lr 0.01 \
      --weight-decay 1e-4 --sched cosine --smoothing 0.1 --amp bf16
fi
if [[ $stage == long2_rl || $stage == long2_all ]]; then
  # rl from the 140-epoch backbone as in long_rl, then ft distilled from that backbone (gates open). The teacher was
  # trained with label smoothing, whose logits carry little beyond the label at high temperature: T = 1
  for alpha in ${LONG2_ALPHAS:-0.7 0.65}; do
    long2_rl "$alpha"
    run "c10_r38_long2_kd_a${alpha}" --stage ft --initial-checkpoint "$RUNS/c10_r38_long2_rl_a${alpha}/model" \
        --distill-from "$RUNS/c10_r38_long2/model" --distill-weight 0.7 --distill-temperature 1 \
        --epochs 5 --lr 0.01 --weight-decay 1e-4 --sched cosine --amp bf16
  done
fi
if [[ $stage == long2_kd15 ]]; then
  # the same rl model, distilled ft for 15 epochs instead of 5 (165 epochs in all; the 190-epoch long3 is its
  # longer-trained gates-open baseline), without and with label smoothing
  for alpha in ${LONG2_ALPHAS:-0.7}; do
    KD15=(--stage ft --initial-checkpoint "$RUNS/c10_r38_long2_rl_a${alpha}/model" --distill-from "$RUNS/c10_r38_long2/model"
          --distill-weight 0.7 --distill-temperature 1 --epochs 15 --lr 0.01 --weight-decay 1e-4 --sched cosine
          --eval-every-epochs 5 --amp bf16)
    run "c10_r38_long2_kd15_a${alpha}" "${KD15[@]}" &
    run "c10_r38_long2_kd15ls_a${alpha}" "${KD15[@]}" --smoothing 0.1 &
    wait
  done
fi
if [[ $stage == long2_swa ]]; then
  # weight averaging (SWA, defined above) over 15 epochs at a constant lr 0.01, for both sides at the same budget (165 epochs):
  #   long2_swa(25)     gates open from the 140-epoch backbone (its recipe: wd 5e-4, smoothing 0.1), 15 / 25 epochs
  #   long2_kdswa_a*    the distilled ft of long2_kd_a* (15 epochs instead of 5), averaged the same way, with the
  #                     averaged ResNet-38 (long2_swa, the most accurate gates-open network of the lineage) as teacher
  run c10_r38_long2_swa --stage base --initial-checkpoint "$RUNS/c10_r38_long2/model" --weight-decay 5e-4 \
      --smoothing 0.1 "${SWA[@]}"
  # the same averaged over 25 epochs: 165 epochs in all, exactly the SkipNet's budget (140 + rl 10 + ft 15)
  run c10_r38_long2_swa25 --stage base --initial-checkpoint "$RUNS/c10_r38_long2/model" --weight-decay 5e-4 \
      --smoothing 0.1 "${SWA[@]}" --epochs 25
  for alpha in ${LONG2_ALPHAS:-0.7}; do
    long2_kdswa "$alpha"
  done
fi
if [[ $stage == long2_rlswa ]]; then
  # rl, then straight to the SWA distilled ft of long2_swa (which starts from the rl model, not from long2_kd_a*);
  # needs long2 and long2_swa. Alphas between 0.65 (13.9 blocks) and 0.68 (12.2) aim at 12.6: 30 % fewer MACs
  for alpha in ${LONG2_ALPHAS:-0.66 0.67}; do
    long2_rl "$alpha"
    long2_kdswa "$alpha"
  done
fi
if [[ $stage == long2_swa_ext ]]; then
  # both sides of long2_swa averaged 10 epochs longer (175 epochs in all): long2_swa35 and long2_kdswa25_a*. At a
  # constant lr a run's length changes nothing before its end, so each continues the shorter run's last checkpoint
  # (resuming with more --epochs is allowed for --sched none and is bit-identical to the longer run from the start)
  for alpha in ${LONG2_ALPHAS:-0.7}; do
    extend "long2_kdswa_a${alpha}" "long2_kdswa25_a${alpha}"
    run "c10_r38_long2_kdswa25_a${alpha}" --stage ft --initial-checkpoint "$RUNS/c10_r38_long2_rl_a${alpha}/model" \
        --distill-from "$RUNS/c10_r38_long2_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" --epochs 25
  done
  extend long2_swa25 long2_swa35
  run c10_r38_long2_swa35 --stage base --initial-checkpoint "$RUNS/c10_r38_long2/model" --weight-decay 5e-4 \
      --smoothing 0.1 "${SWA[@]}" --epochs 35
fi
if [[ $stage == long2_kdswawd ]]; then
  # long2_kdswa_a* with the ResNet-38's SWA weight decay (5e-4 instead of 1e-4): with BatchNorm a larger decay is a
  # larger effective step, so the averaged iterates are more diverse (165 epochs, baseline long2_swa25)
  for alpha in ${LONG2_ALPHAS:-0.7}; do
    run "c10_r38_long2_kdswawd_a${alpha}" --stage ft --initial-checkpoint "$RUNS/c10_r38_long2_rl_a${alpha}/model" \
        --distill-from "$RUNS/c10_r38_long2_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 5e-4 "${SWA[@]}"
  done
fi
if [[ $stage == long2_kdswat25 ]]; then
  # long2_kdswa_a* distilled from the 25-epoch average (90.67 %) instead of the 15-epoch one (90.49 %)
  for alpha in ${LONG2_ALPHAS:-0.7}; do
    run "c10_r38_long2_kdswat25_a${alpha}" --stage ft --initial-checkpoint "$RUNS/c10_r38_long2_rl_a${alpha}/model" \
        --distill-from "$RUNS/c10_r38_long2_swa25/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}"
  done
fi
if [[ $stage == long2_ent ]]; then
  # rl with an entropy bonus on the gate decisions (--rl-entropy RL_ENTROPY, default 0.1: near p = 0.9 its pull on
  # a gate's logit is about the size of the skip reward's), then the same SWA distilled ft: can the gates settle on
  # per-image decisions instead of p = 0 or 1?
  for alpha in ${LONG2_ALPHAS:-0.7}; do
    long2_rl "$alpha" rlent --rl-entropy "${RL_ENTROPY:-0.1}"
    long2_kdswa "$alpha" rlent kdswaent
  done
fi
if [[ $stage == thr || $stage == thr_cos ]]; then
  # from the weights published on 2026-11-26 (long2_kdswa_a0.7: 12 static blocks, 90.01 %, 165 epochs), copied once to runs/ so that a
  # republished folder does not change the start: gate THR_GATES runs its block for THR_RATE of the training images
  # (timm-skipnet threshold, on the first 10,000 training images, as first run), then 10 epochs of SWA ft
  # self-distilled from the published model running its own gates (175 epochs in all, as long2_swa35). thr_ctl is
  # the same ft without the threshold (the control)
  pub="$RUNS/c10_r38_published_long2"
  if [ ! -f "$pub/model.safetensors" ]; then
    # pinned: the long2_kdswa_a0.7 weights, not whatever is published when this runs
    pinned=131e5e4b32143dcd3bc288c868ef7e645738c9df8e416feaa7f1bc0e8c072344
    if [ "$(sha256sum < hub_configs/skipnet_resnet38_cifar.cifar10/model.safetensors | cut -d' ' -f1)" != "$pinned" ]; then
      echo "stage $stage starts from the long2_kdswa_a0.7 weights (sha256 $pinned), but hub_configs/ now holds others:" \
           "restore them with 'git checkout 88be1f8 -- hub_configs/skipnet_resnet38_cifar.cifar10'" >&2
      exit 1
    fi
    mkdir -p "$pub.tmp" && cp hub_configs/skipnet_resnet38_cifar.cifar10/{config.json,model.safetensors} "$pub.tmp/"
    echo "$RUNS/c10_r38_long2_kdswa_a0.7" > "$pub.tmp/origin"  # the run these weights came from (for the report)
    mv "$pub.tmp" "$pub"
  fi
  THR=(--stage ft --distill-from "$pub" --distill-gates greedy --distill-weight 0.7 --distill-temperature 1
       --weight-decay 1e-4 "${SWA[@]}" --epochs 10)
  suffix=""
  if [[ $stage == thr_cos ]]; then
    # thr_cos: 5 epochs at a small cosine lr (0.002 -> 0) instead of restarting the average, which thr showed costs
    # more than 10 epochs to regain; the published weights stay in their basin while the reopened block adapts
    THR=(--stage ft --distill-from "$pub" --distill-gates greedy --distill-weight 0.7 --distill-temperature 1
         --weight-decay 1e-4 --sched cosine --lr 0.002 --epochs 5 --amp bf16)
    suffix=_cos
  fi
  for gate in ${THR_GATES:-8}; do
    name="thr_g${gate}_r${THR_RATE:-0.5}"
    init="$RUNS/c10_r38_${name}.init.safetensors"
    [ -f "$init" ] || "$PY" -m timm_skipnet.cli threshold --model skipnet_resnet38_cifar --checkpoint "$pub" \
        --num-classes 10 --dataset "$DATA" --gate "$gate" --rate "${THR_RATE:-0.5}" --sample first --output "$init"
    [ -f "$init.origin" ] || echo "$pub" > "$init.origin"
    run "c10_r38_$name$suffix" --initial-checkpoint "$init" "${THR[@]}"
  done
  [[ ${THR_CONTROL:-1} == 1 ]] && run "c10_r38_thr_ctl$suffix" --initial-checkpoint "$pub" "${THR[@]}"
fi
if [[ $stage == long2_ft ]]; then  # the ablation of the distillation: plain ft of the same rl models
  for alpha in ${LONG2_ALPHAS:-0.7}; do
    run "c10_r38_long2_ft_a${alpha}" --stage ft --initial-checkpoint "$RUNS/c10_r38_long2_rl_a${alpha}/model" \
        --epochs 5 --lr 0.01 --weight-decay 1e-4 --sched cosine --amp bf16
  done
fi
DP=(--drop-path 0.1 --amp bf16)
if [[ $stage == dp || $stage == dp_all ]]; then
  # lessons of the long chain: one cosine schedule instead of warm restarts, label smoothing from the start, and
  # stochastic depth so that skipping a block later is a perturbation the backbone was trained under
  run c10_r38_dp --stage base --epochs 100 --lr 0.1 --weight-decay 5e-4 --sched cosine --warmup-epochs 1 \
      --smoothing 0.1 --eval-every-epochs 10 "${DP[@]}"
fi
if [[ $stage == dp_all ]]; then
  run c10_r38_dp_swa --stage base --initial-checkpoint "$RUNS/c10_r38_dp/model" --weight-decay 5e-4 \
      --smoothing 0.1 "${SWA[@]}" "${DP[@]}"
  # the 25-epoch average continues the 15-epoch one (constant lr: bit-identical to a 25-epoch run from the start)
  extend dp_swa dp_swa25
  run c10_r38_dp_swa25 --stage base --initial-checkpoint "$RUNS/c10_r38_dp/model" --weight-decay 5e-4 \
      --smoothing 0.1 "${SWA[@]}" --epochs 25 "${DP[@]}"
  for alpha in ${DP_ALPHAS:-0.7 0.68}; do
    run "c10_r38_dp_rl_a$alpha" --stage rl --initial-checkpoint "$RUNS/c10_r38_dp/model" --epochs 10 \
        --lr 0.01 --weight-decay 1e-4 --sched cosine --reset-gates --gate-init-bias 0 --rl-baseline batch_mean \
        --alpha "$alpha" --rl-warmup-epochs 3 --eval-every-epochs 5 "${DP[@]}"
    run "c10_r38_dp_kdswa_a$alpha" --stage ft --initial-checkpoint "$RUNS/c10_r38_dp_rl_a$alpha/model" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" "${DP[@]}"
  done
fi
if [[ $stage == dp_kdrl ]]; then
  # the rl stage itself distilled from the teacher of the ft (dp_swa): the backbone keeps the teacher's function
  # while the gates learn to drop blocks, instead of recovering it only in the ft; then the same distilled SWA ft
  for alpha in ${DP_ALPHAS:-0.7}; do
    run "c10_r38_dp_kdrl_a$alpha" --stage rl --initial-checkpoint "$RUNS/c10_r38_dp/model" --epochs 10 \
        --lr 0.01 --weight-decay 1e-4 --sched cosine --reset-gates --gate-init-bias 0 --rl-baseline batch_mean \
        --alpha "$alpha" --rl-warmup-epochs 3 --eval-every-epochs 5 "${DP[@]}" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1
    run "c10_r38_dp_kdrlswa_a$alpha" --stage ft --initial-checkpoint "$RUNS/c10_r38_dp_kdrl_a$alpha/model" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" "${DP[@]}"
  done
fi
if [[ $stage == dp_seed ]]; then
  # the noise of the last stage: dp_kdswa repeated from the same rl model with another seed (data order, drop path)
  for alpha in ${DP_ALPHAS:-0.7}; do
    run "c10_r38_dp_kdswaseed${SEED:-1}_a$alpha" --stage ft --initial-checkpoint "$RUNS/c10_r38_dp_rl_a$alpha/model" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" "${DP[@]}" --seed "${SEED:-1}"
  done
fi
if [[ $stage == dp_nodp ]]; then
  # dp_kdswa without stochastic depth in the ft: the SkipNet runs 12 of 18 blocks, a smaller network than the one
  # drop path regularised, and its averaged accuracy still rose at the end of the ft (89.11 -> 89.34 -> 89.59)
  for alpha in ${DP_ALPHAS:-0.7}; do
    run "c10_r38_dp_kdswanodp_a$alpha" --stage ft --initial-checkpoint "$RUNS/c10_r38_dp_rl_a$alpha/model" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" "${DP[@]}" --drop-path 0
  done
fi
if [[ $stage == dp_swa_ext ]]; then
  # both sides of the dp family averaged 10 epochs longer (135 epochs in all): dp_kdswa25_a* and dp_swa35. At the
  # end of their 15 epochs the SkipNets' averages still rose 0.25 points per 5 epochs, the ResNet-38's 0.05-0.08;
  # each continues the shorter run's last checkpoint (constant lr: bit-identical to the longer run from the start)
  for alpha in ${DP_ALPHAS:-0.7}; do
    extend "dp_kdswa_a$alpha" "dp_kdswa25_a$alpha"
    run "c10_r38_dp_kdswa25_a$alpha" --stage ft --initial-checkpoint "$RUNS/c10_r38_dp_rl_a$alpha/model" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" "${DP[@]}" --epochs 25
  done
  extend dp_swa25 dp_swa35
  run c10_r38_dp_swa35 --stage base --initial-checkpoint "$RUNS/c10_r38_dp/model" --weight-decay 5e-4 \
      --smoothing 0.1 "${SWA[@]}" --epochs 35 "${DP[@]}"
fi
if [[ $stage == dp_seed_ext ]]; then  # dp_kdswaseed<SEED>_a* (stage dp_seed) averaged 10 epochs longer, as dp_swa_ext
  for alpha in ${DP_ALPHAS:-0.7}; do
    extend "dp_kdswaseed${SEED:-1}_a$alpha" "dp_kdswa25seed${SEED:-1}_a$alpha"
    run "c10_r38_dp_kdswa25seed${SEED:-1}_a$alpha" --stage ft --initial-checkpoint "$RUNS/c10_r38_dp_rl_a$alpha/model" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" "${DP[@]}" --seed "${SEED:-1}" --epochs 25
  done
fi
if [[ $stage == dp_nodp_ext ]]; then  # dp_kdswanodp_a* (stage dp_nodp) averaged 10 epochs longer, as dp_swa_ext
  for alpha in ${DP_ALPHAS:-0.7}; do
    extend "dp_kdswanodp_a$alpha" "dp_kdswa25nodp_a$alpha"
    run "c10_r38_dp_kdswa25nodp_a$alpha" --stage ft --initial-checkpoint "$RUNS/c10_r38_dp_rl_a$alpha/model" \
        --distill-from "$RUNS/c10_r38_dp_swa/model" --distill-weight 0.7 --distill-temperature 1 \
        --weight-decay 1e-4 "${SWA[@]}" "${DP[@]}" --drop-path 0 --epochs 25
  done
fi
if [[ $stage == long3 || $stage == long3_all ]]; then
  # a third warm restart (+50 epochs, label smoothing 0.1) of the 140-epoch backbone: the 190-epoch backbone
  run c10_r38_long3 --stage base --initial-checkpoint "$RUNS/c10_r38_long2/model" --epochs 50 --lr 0.05 \
      --weight-decay 5e-4 --sched cosine --warmup-epochs 1 --smoothing 0.1 --eval-every-epochs 10 --amp bf16
fi
if [[ $stage == long3_base_ft || $stage == long3_all ]]; then
  # its same-budget baseline: +15 epochs gates open (= rl 10 + ft 5), keeping label smoothing (without it
  # long2_base_ft overfitted: 89.39 vs 89.56 % with it)
  run c10_r38_long3_base_ft --stage base --initial-checkpoint "$RUNS/c10_r38_long3/model" --epochs 15 --lr 0.01 \
      --weight-decay 1e-4 --sched cosine --smoothing 0.1 --amp bf16
fi
if [[ $stage == long3_rl || $stage == long3_all ]]; then
  # exactly long2_rl (alpha 0.7, 12 blocks there) from the better backbone
  for alpha in ${LONG3_ALPHAS:-0.7}; do
    run "c10_r38_long3_rl_a${alpha}" --stage rl --initial-checkpoint "$RUNS/c10_r38_long3/model" --epochs 10 \
        --lr 0.01 --weight-decay 1e-4 --sched cosine --reset-gates --gate-init-bias 0 --rl-baseline batch_mean \
        --alpha "$alpha" --rl-warmup-epochs 3 --eval-every-epochs 5 --amp bf16
    run "c10_r38_long3_kd_a${alpha}" --stage ft --initial-checkpoint "$RUNS/c10_r38_long3_rl_a${alpha}/model" \
        --distill-from "$RUNS/c10_r38_long3/model" --distill-weight 0.7 --distill-temperature 1 \
        --epochs 5 --lr 0.01 --weight-decay 1e-4 --sched cosine --amp bf16
  done
fi
if [[ $stage == base164 ]]; then  # (started, not finished: 3.7 h) the paper's 164-epoch schedule from scratch, bf16: for the >= 90 % baseline
  run c10_r38_base164 --stage base --epochs 164 --lr 0.1 --weight-decay 5e-4 --sched cosine --warmup-epochs 1 \
      --eval-every-epochs 20 --amp bf16
fi
if [[ $stage == long_ft || $stage == long_all ]]; then  # the same-budget baseline of the long family (15 = rl + ft)
  run c10_r38_long_base_ft --stage base --initial-checkpoint "$RUNS/c10_r38_long/model" --epochs 15 --lr 0.01 \
      --weight-decay 1e-4 --sched cosine --amp bf16
fi
if [[ $stage == long_rl || $stage == long_all ]]; then
  # rl from the 90-epoch backbone (fresh gates at p = 0.5, 3-epoch REINFORCE warm-up), then ft: the backbone
  # fine-tuned for 5 epochs under the learned greedy policy with the gates frozen
  for alpha in ${LONG_ALPHAS:-0.6 0.75}; do
    run "c10_r38_long_rl_a${alpha}" --stage rl --initial-checkpoint "$RUNS/c10_r38_long/model" --epochs 10 \
        --lr 0.01 --weight-decay 1e-4 --sched cosine --reset-gates --gate-init-bias 0 --rl-baseline batch_mean \
        --alpha "$alpha" --rl-warmup-epochs 3 --eval-every-epochs 5 --amp bf16
    run "c10_r38_long_ft_a${alpha}" --stage ft --initial-checkpoint "$RUNS/c10_r38_long_rl_a${alpha}/model" \
        --epochs 5 --lr 0.01 --weight-decay 1e-4 --sched cosine --amp bf16
  done
fi
if [[ $stage == rl || $stage == all ]]; then
  RL=(--stage rl "${FINETUNE[@]}" --reset-gates --gate-init-bias 0 --rl-baseline batch_mean --eval-every-epochs 5)
  # rl warm-up: the first epochs keep every gate at p = 0.5 (REINFORCE off), so the backbone learns to run with
  # random blocks missing before the policy learns which ones to drop; without it small alphas collapse to "run all"
  for alpha in ${ALPHAS:-1.0 0.5}; do
    run "c10_r38_rl_a${alpha}_w3" "${RL[@]}" --alpha "$alpha" --rl-warmup-epochs 3
  done
  run c10_r38_rl_a2.0 "${RL[@]}" --alpha 2.0   # no warm-up needed at this alpha
fi
if [[ $stage == base_ft || $stage == all ]]; then
  run c10_r38_base_ft --stage base "${FINETUNE[@]}"
fi
if [[ $stage == ft ]]; then  # (optional) ft of the alpha-2.0 model of the 50-epoch family
  run c10_r38_ft_a2.0 --stage ft --initial-checkpoint "$RUNS/c10_r38_rl_a2.0/model" --epochs 5 --lr 0.01 \
      --weight-decay 1e-4 --sched cosine --amp bf16
fi
if [[ $stage == sp ]]; then
  run c10_r38_sp --stage sp --initial-checkpoint "$RUNS/c10_r38_base/model" --reset-gates --gate-init-bias 0.5 \
      --epochs 3 --lr 0.01 --weight-decay 5e-4 --sched cosine
fi
