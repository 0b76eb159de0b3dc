#!/usr/bin/env bash
# The recipe of the shipped SkipNet-38 (hub_configs/skipnet_resnet38_cifar.cifar10): 89.73 % top-1 on the CIFAR-10
# test split at 36.7 % fewer MACs; its same-budget ResNet-38 reaches 90.19 %. Steps, in order (default: all five):
#   backbone  ResNet-38, gates open, 100 epochs from scratch: cosine lr 0.1, label smoothing 0.1, stochastic depth 0.1
#   teacher   + 15 epochs of SWA (constant lr 0.01, plain mean of the weights after every update), gates open
#   baseline  the same averaged over 35 epochs (135 in all): the ResNet-38 the SkipNet is compared with
#   rl        + 10 epochs of hybrid RL from fresh gates at p = 0.5: alpha $ALPHA, batch-mean baseline, and a 3-epoch
#             warm-up without REINFORCE in which the backbone learns to run with random blocks missing
#   ft        + 25 epochs of ft under the learned gates (frozen), distilled from the teacher, averaged by SWA (135)
#   paper     (optional, not in the default) the paper's CIFAR schedule: sp 64k updates, then rl at lr 1e-4, alpha 0.1
#   budget    (optional) rl to a compute budget instead of alpha: for each T in $TARGETS (shares of the full MACs),
#             the rl step with --target-macs T instead of --alpha, from the shipped backbone with fresh gates
#             (docs/target_macs.md)
#   budget-alpha  (optional) the same rl step from the same start with --alpha A for each A in $ALPHAS: the alpha
#             runs the budget runs are compared with, like for like
#   budget-ft (optional) the same short ft ($FT_EPOCHS epochs, gates frozen, distilled from the shipped model with every
#             gate open, averaged by SWA) after every budget and budget-alpha run
#   (the budget steps train with seed $SEED; a seed other than 0 adds "seed<N>" to their run names; TARGETS="" or
#   ALPHAS="" leaves that kind out; MACS_KP=K adds --macs-lambda-kp K, the multiplier's proportional gain, to the
#   budget runs and "kp<K>" to their names)
# Then `.venv/bin/python examples/cifar10_report.py` chooses, exports to hub_configs/, plots and times. Every step
# checkpoints each epoch and resumes where it stopped. About 5 h on a 2-core CPU with bf16 (avx512_bf16). How this
# recipe was found, with the commands of every other run: docs/experiments/cifar10.md.
#   CIFAR10_DIR=../shared/data/cifar10/plain [ALPHA=0.7] [SEED=0] bash examples/cifar10_skipnet38.sh [step ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CIFAR10_DIR:-../shared/data/cifar10/plain} RUNS=${RUNS:-runs} PY=${PYTHON:-.venv/bin/python}
ALPHA=${ALPHA:-0.7} SEED=${SEED:-0} TARGETS=${TARGETS-0.7 0.55 0.4} ALPHAS=${ALPHAS-1.0 0.75}
FT_EPOCHS=${FT_EPOCHS:-5} MACS_KP=${MACS_KP:-0}
SHIPPED=local-dir:hub_configs/skipnet_resnet38_cifar.cifar10
# TRAIN_EXTRA: trainer flags for this machine (e.g. "--workers 4" on a GPU host); none change the recipe
# shellcheck disable=SC2206
COMMON=(--model skipnet_resnet38_cifar --dataset "$DATA" --batch-size 128 --checkpoint-every 390 --log-every 50
        --amp bf16 ${TRAIN_EXTRA:-})
SWA=(--sched none --lr 0.01 --model-ema --model-ema-decay 1 --model-ema-warmup --model-ema-warmup-power 1
     --eval-every-epochs 5 --drop-path 0.1)

run() {  # run <name> <flags...>: skipped when finished, resumed when a checkpoint exists
  local out="$RUNS/$1"; shift
  if [ -f "$out/model/model.safetensors" ]; then echo "[$out] done"; return; fi
  local resume=(); [ -f "$out/checkpoints/latest" ] && resume=(--resume "$out")
  "$PY" examples/finetune.py "${COMMON[@]}" --output "$out" "${resume[@]}" "$@"
}

steps=("$@"); (( ${#steps[@]} )) || steps=(backbone teacher baseline rl ft)
suffix=$([[ $SEED == 0 ]] || echo "seed$SEED")
kp_suffix=$([[ $MACS_KP == 0 ]] || echo "kp$MACS_KP")
for step in "${steps[@]}"; do
  case $step in
    backbone) run c10_r38_dp --stage base --seed 0 --epochs 100 --lr 0.1 --weight-decay 5e-4 --sched cosine \
                  --warmup-epochs 1 --smoothing 0.1 --drop-path 0.1 --eval-every-epochs 10 ;;
    teacher)  run c10_r38_dp_swa --stage base --seed 0 --initial-checkpoint "$RUNS/c10_r38_dp/model" \
                  --weight-decay 5e-4 --smoothing 0.1 "${SWA[@]}" --epochs 15 ;;
    baseline) run c10_r38_dp_swa35 --stage base --seed 0 --initial-checkpoint "$RUNS/c10_r38_dp/model" \
                  --weight-decay 5e-4 --smoothing 0.1 "${SWA[@]}" --epochs 35 ;;
    rl)       run "c10_r38_dp_rl_a$ALPHA" --stage rl --seed 0 --initial-checkpoint "$RUNS/c10_r38_dp/model" \
                  --epochs 10 --lr 0.01 --weight-decay 1e-4 --sched cosine --reset-gates --gate-init-bias 0 \
                  --alpha "$ALPHA" --rl-baseline batch_mean --rl-warmup-epochs 3 --drop-path 0.1 --eval-every-epochs 5 ;;
    ft)       run "c10_r38_dp_kdswa25${suffix}_a$ALPHA" --stage ft --seed "$SEED" \
                  --initial-checkpoint "$RUNS/c10_r38_dp_rl_a$ALPHA/model" --distill-from "$RUNS/c10_r38_dp_swa/model" \
                  --distill-weight 0.7 --distill-temperature 1 --weight-decay 1e-4 "${SWA[@]}" --epochs 25 ;;
    paper)    run c10_r38_paper_sp --stage sp --seed 0 --steps 64000 --lr 0.1 --sched multistep --weight-decay 1e-4 \
                  --amp no
              run c10_r38_paper_rl_a0.1 --stage rl --seed 0 --initial-checkpoint "$RUNS/c10_r38_paper_sp/model" \
                  --steps 10000 --lr 1e-4 --sched none --weight-decay 1e-4 --alpha 0.1 --amp no ;;
    budget)   for T in $TARGETS; do
                run "c10_r38_shipped_rl_t$T$suffix$kp_suffix" --stage rl --seed "$SEED" --initial-checkpoint "$SHIPPED" \
                  --reset-gates --gate-init-bias 0 --epochs 10 --lr 0.01 --weight-decay 1e-4 --sched cosine \
                  --rl-baseline batch_mean --rl-warmup-epochs 3 --drop-path 0.1 --eval-every-epochs 5 \
                  --target-macs "$T" --macs-lambda-init 0.7 --macs-lambda-kp "$MACS_KP"
              done ;;
    budget-alpha) for A in $ALPHAS; do
                run "c10_r38_shipped_rl_a$A$suffix" --stage rl --seed "$SEED" --initial-checkpoint "$SHIPPED" \
                  --reset-gates --gate-init-bias 0 --epochs 10 --lr 0.01 --weight-decay 1e-4 --sched cosine \
                  --rl-baseline batch_mean --rl-warmup-epochs 3 --drop-path 0.1 --eval-every-epochs 5 --alpha "$A"
              done ;;
    budget-ft) for rl_run in $(for T in $TARGETS; do echo "t$T$suffix$kp_suffix"; done) \
                          $(for A in $ALPHAS; do echo "a$A$suffix"; done); do
                run "c10_r38_shipped_ft${FT_EPOCHS}_$rl_run" --stage ft --seed "$SEED" \
                  --initial-checkpoint "$RUNS/c10_r38_shipped_rl_$rl_run/model" --distill-from "${SHIPPED#local-dir:}" \
                  --distill-gates open --distill-weight 0.7 --distill-temperature 1 --weight-decay 1e-4 "${SWA[@]}" \
                  --epochs "$FT_EPOCHS"
              done ;;
    *) echo "unknown step '$step' (backbone, teacher, baseline, rl, ft, paper, budget, budget-alpha, budget-ft)" >&2; exit 2 ;;
  esac
done
