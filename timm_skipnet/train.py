"""The SkipNet trainer on Accelerate: ``base`` -> ``sp`` (supervised pre-training) -> ``rl`` (hybrid REINFORCE).

One function, read top to bottom: accelerator -> model -> optimizer / schedule -> prepare -> (resume) -> loop
-> checkpoint -> evaluate -> export. Runs on CPU, one GPU or many (``accelerate launch``), with mixed precision,
gradient accumulation and clipping. Flags mirror timm's train.py; SkipNet's own carry the paper's symbols.

Stages (the paper's Sec. 3, arXiv:1711.09485; ft is ours):
  base  all gates open, cross-entropy: trains the backbone and is the same-recipe ResNet baseline.
  sp    hard gates with straight-through gradients, cross-entropy only.
  rl    gates sampled from Bernoulli(p); loss = mean CE + rl_weight * sum_{b,k} -log pi(a_bk) * G_bk. The return
        rewards skipping (--alpha), or with --target-macs prices each image's exact MACs against a budget with a
        Lagrange multiplier adapted by dual ascent (rewards.MacsBudget; docs/target_macs.md).
  ft    (after rl; not in the paper) the learned greedy policy, frozen; cross-entropy trains the backbone for the
        blocks each image really runs, so the network stops paying for the randomness rl sampled.

Any stage can also distil from a teacher (``--distill-from``, e.g. the full backbone the run started from): the
cross-entropy term becomes (1 - w) * CE + w * T^2 * KL(teacher_T || student_T) (Hinton et al., 2015), which lets a
network that skips blocks copy the full network's outputs instead of only the labels.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .checkpoints import (
    EMA_BN_FILE,
    EMA_FILE,
    RNG_FILE,
    accelerate_rng_problem,
    atomic_write_text,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

STAGE_POLICY = {'base': 'open', 'sp': 'straight_through', 'rl': 'sample', 'ft': 'greedy'}
FROZEN_GATE_STAGES = ('base', 'ft')


@dataclass
class TrainConfig:
    # model
    model: str = field(default='skipnet_resnet38_cifar', metadata=dict(help='skipnet_* name or any timm ResNet name'))
    pretrained: bool = field(default=False, metadata=dict(help='start from pretrained weights (timm / Hub)'))
    initial_checkpoint: str = field(default='', metadata=dict(help='weights to start from: .safetensors, a '
                                                                   'weights-only .pth, or an exported folder '
                                                                   '(also as local-dir:<folder>)'))
    resume: str = field(default='', metadata=dict(help='checkpoint dir (or run output dir) to resume'))
    resume_without_rng_state: bool = field(default=False, metadata=dict(help=(
        'resume a checkpoint whose random state is missing or unreadable (refused otherwise): the run goes on from '
        'a fresh random state, so it no longer reproduces an uninterrupted run; its checkpoints record '
        '"reproducible": false')))
    num_classes: Optional[int] = field(default=None, metadata=dict(help='default: from the dataset preset'))
    gate_type: str = field(default='rnn', metadata=dict(help='rnn | ff1 | ff2'))
    reset_gates: bool = field(default=False, metadata=dict(
        help='re-initialise the gates after loading weights (start sp or rl from a gates-open backbone)'))
    gate_init_bias: float = field(default=3.0, metadata=dict(
        help='initial gate logit for new / reset gates: 3 = open (p 0.95); near 0 lets sp flip them sooner'))
    drop_path: float = field(default=0.0, metadata=dict(help=(
        "stochastic depth (timm's drop_path_rate, linear in block index to this value at the last block): a "
        "backbone trained with blocks randomly dropped loses less when its gates later skip them")))
    # data
    dataset: str = field(default='uoft-cs/cifar10', metadata=dict(
        help='Hub dataset (streamed) or a local folder of Parquet files / an image folder'))
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: Optional[str] = None
    eval_split: Optional[str] = None
    train_num_samples: Optional[int] = field(default=None, metadata=dict(help='samples per epoch (streams)'))
    eval_num_samples: Optional[int] = field(default=None, metadata=dict(help='cap on evaluation samples'))
    shuffle_buffer: int = 10_000
    workers: int = field(default=0, metadata=dict(help='DataLoader workers (0: decode in the main process)'))
    # stage and SkipNet objective
    stage: str = field(default='base', metadata=dict(help='base | sp | rl | ft (frozen greedy gates)'))
    alpha: float = field(default=0.1, metadata=dict(help='skip reward alpha (paper: 0.1 on CIFAR)'))
    beta: float = field(default=1.0, metadata=dict(help='weight beta of -CE in the return (paper: 1 on CIFAR)'))
    gamma: float = field(default=1.0, metadata=dict(help='reward discount gamma'))
    rl_weight: float = field(default=0.01, metadata=dict(help='weight of the REINFORCE term'))
    rl_baseline: str = field(default='none', metadata=dict(help="none | batch_mean (variance reduction)"))
    rl_entropy: float = field(default=0.0, metadata=dict(
        help='rl: weight of an entropy bonus sum_{b,k} H(p_bk) inside the REINFORCE term; keeps the gates '
             'stochastic longer (0: the paper\'s objective)'))
    rl_warmup_epochs: float = field(default=0.0, metadata=dict(
        help='rl: epochs with the REINFORCE term off at the start; the gates keep their initial p (0.5 with '
             '--gate-init-bias 0) while the backbone learns to run with random blocks missing'))
    target_macs: str = field(default='', metadata=dict(help=(
        "rl: train to a compute budget instead of a skip reward (replaces --alpha). A share of the full model's "
        "exact MACs (0.6 or 60%%) or MACs per image with a unit (52.7M, 0.0527G); each image pays lambda times its "
        'sampled MACs above the budget (earns it below), and lambda follows dual ascent so that the mean lands on '
        'the budget')))
    macs_lambda_init: float = field(default=0.0, metadata=dict(help=(
        'rl with --target-macs: the Lagrange multiplier lambda at the start, in nats of cross-entropy per full '
        "model's MACs (a resumed run keeps its own)")))
    macs_lambda_lr: float = field(default=0.02, metadata=dict(help=(
        'rl with --target-macs: dual-ascent step, lambda <- max(0, lambda + lr * (batch mean MACs share - target '
        'share)) after every update; 0 keeps lambda fixed')))
    macs_lambda_kp: float = field(default=0.0, metadata=dict(help=(
        'rl with --target-macs: proportional gain of the price, lambda = max(0, integral + kp * (batch mean MACs '
        'share - target share)), the integral stepped as --macs-lambda-lr says; damps the overshoot of a policy '
        'that answers the price late (0: plain dual ascent)')))
    distill_from: str = field(default='', metadata=dict(help=(
        'teacher weights (exported folder or .safetensors) of the same architecture, run as --distill-gates says; '
        'adds a distillation term to the cross-entropy')))
    distill_gates: str = field(default='open', metadata=dict(help=(
        "how the teacher runs: 'open' (every block: a ResNet teacher) or 'greedy' (its own gates: a SkipNet "
        "teacher, e.g. the model being fine-tuned)")))
    distill_weight: float = field(default=0.9, metadata=dict(help='w: loss = (1 - w) CE + w T^2 KL'))
    distill_temperature: float = field(default=4.0, metadata=dict(help='T of the distillation softmax'))
    # optimisation (timm train.py names)
    epochs: int = 10
    steps: Optional[int] = field(default=None, metadata=dict(help='optimizer updates in total (overrides epochs)'))
    batch_size: int = field(default=128, metadata=dict(help='per process'))
    grad_accum_steps: int = 1
    opt: str = 'sgd'
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sched: str = field(default='cosine', metadata=dict(help='cosine | step | multistep | none'))
    warmup_epochs: float = 0.0
    decay_milestones: List[float] = field(default_factory=lambda: [0.5, 0.75],
                                          metadata=dict(help='multistep: fractions of the run'))
    decay_rate: float = 0.1
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    smoothing: float = 0.0
    model_ema: bool = field(default=False, metadata=dict(help=(
        "keep timm's ModelEmaV3 average of the weights; the final eval and export use it (the raw weights are "
        "evaluated as eval_<stage>_no_ema.json)")))
    model_ema_decay: float = field(default=0.9998, metadata=dict(help='EMA decay per update (upper bound with warmup)'))
    model_ema_warmup: bool = field(default=False, metadata=dict(help=(
        'decay warmup 1 - (1 + step)^-power; with --model-ema-warmup-power 1 and --model-ema-decay 1 the EMA is '
        'the plain average of every update (SWA, Izmailov et al., 2018)')))
    model_ema_warmup_power: float = field(default=2 / 3, metadata=dict(help='power of the decay warmup'))
    model_ema_update_bn: int = field(default=0, metadata=dict(help=(
        'after training, recompute the BatchNorm statistics of the average with one pass over this many training '
        'images (torch.optim.swa_utils.update_bn: statistics reset, then a cumulative mean over the batches; dense, '
        'gates as deployed) and evaluate / export that. 0 keeps the averaged running statistics, which are not the '
        "statistics of the averaged weights (what the published SWA runs used). The checkpoint keeps the plain "
        f'average ({EMA_FILE}, so the run can be extended) beside the recomputed one ({EMA_BN_FILE})')))
    amp: str = field(default='no', metadata=dict(help='mixed precision: no | fp16 | bf16'))
    cpu: bool = field(default=False, metadata=dict(help='run on CPU even when a GPU is present'))
    compile: bool = field(default=False, metadata=dict(help=(
        'torch.compile the training forward and backward (dense execution, every stage): on a GPU the gated step '
        'then costs close to a plain step; evaluation stays eager. The first steps compile (minutes)')))
    # bookkeeping
    output: str = 'runs/skipnet'
    seed: int = 42
    checkpoint_every: int = field(default=500, metadata=dict(help='save_state every N updates (and at the end)'))
    keep_checkpoints: int = 2
    eval_every_epochs: int = field(default=0, metadata=dict(help='0: evaluate at the end only'))
    log_every: int = 20
    log_with: str = field(default='', metadata=dict(help="tracker, e.g. 'tensorboard'"))
    export: bool = field(default=True, metadata=dict(help='write a Hub-ready folder at the end'))


def _add_bool(parser, name, default, help_):
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help_)


def build_arg_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """argparse flags generated from :class:`TrainConfig` (``--grad-accum-steps`` style) plus ``-c cfg.yaml``."""
    parser = parser or argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-c', '--config', default='', help='YAML file of defaults (keys as the long flags)')
    for f in dataclasses.fields(TrainConfig):
        flag = '--' + f.name.replace('_', '-')
        names = [flag, '-b'] if f.name == 'batch_size' else [flag]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get('help', '') + f' (default: {default})'
        if f.type in (bool, 'bool'):
            _add_bool(parser, flag, default, help_)
        elif f.name == 'decay_milestones':
            parser.add_argument(*names, type=float, nargs='+', default=default, help=help_)
        else:
            kind = {int: int, float: float, 'int': int, 'float': float}.get(f.type)
            if kind is None:
                kind = int if f.name in ('num_classes', 'steps', 'train_num_samples', 'eval_num_samples') else (
                    float if f.name == 'clip_grad' else str)
            parser.add_argument(*names, type=kind, default=default, help=help_)
    return parser


def parse_config(argv=None) -> TrainConfig:
    parser = build_arg_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        import yaml
        with open(args.config) as f:
            overrides = {k.replace('-', '_'): v for k, v in (yaml.safe_load(f) or {}).items()}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f'Unknown keys in {args.config}: {sorted(unknown)}.')
        parser.set_defaults(**overrides)
    return config_from_args(parser.parse_args(argv))


def config_from_args(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


# ---- model ---------------------------------------------------------------------------------------------------------
def weights_path(spec: str) -> str:
    """A weights file or exported folder; ``local-dir:<folder>`` (timm's spelling of an exported folder, what
    ``timm-skipnet eval --model`` takes) names the folder itself."""
    return spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec


def build_model(cfg: TrainConfig, num_classes: int):
    """A SkipNet from a skipnet_* name or any timm ResNet name; returns (model, model_args for config.json)."""
    import timm

    import timm_skipnet  # noqa: F401 -- registers the models
    if not 0.0 <= cfg.drop_path < 1.0:
        raise ValueError(f'--drop-path must be in [0, 1), got {cfg.drop_path}.')
    # training-only arguments stay out of model_args, which config.json records for inference
    train_args = dict(drop_path_rate=cfg.drop_path) if cfg.drop_path else {}
    if cfg.model.startswith('skipnet_'):
        model_args = dict(num_classes=num_classes, gate_type=cfg.gate_type)
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **model_args, **train_args)
        arch = cfg.model
    else:
        model_args = dict(base_model=cfg.model, num_classes=num_classes, gate_type=cfg.gate_type)
        model = timm.create_model('skipnet_from_timm', base_pretrained=cfg.pretrained, **model_args, **train_args)
        arch = 'skipnet_from_timm'
    if cfg.initial_checkpoint:
        from .loading import load_weights
        load_weights(model, weights_path(cfg.initial_checkpoint))
    if cfg.reset_gates:
        model.gates.init_weights(cfg.gate_init_bias)
        model.set_gate_thresholds(0.5)
    elif cfg.stage in ('sp', 'rl') and bool(model.gate_threshold_logits.any()):
        # sp / rl train the gates under their own p > 0.5 / sampling rules: thresholds calibrated on the old gates
        # would only shift the retrained policy at evaluation
        import warnings
        source = cfg.initial_checkpoint or cfg.model
        warnings.warn(f'--stage {cfg.stage} retrains the gates: the greedy thresholds of {source} '
                      f'({[round(t, 4) for t in model.gate_thresholds.tolist()]}) are reset to 0.5; calibrate new ones '
                      'afterwards with `timm-skipnet threshold`.', stacklevel=2)
        model.set_gate_thresholds(0.5)
    return model, arch, model_args


# ---- schedule ------------------------------------------------------------------------------------------------------
def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int, steps_per_epoch: int):
    """timm scheduler counted in optimizer updates, so resuming at any step gives the same learning rate."""
    if cfg.sched == 'none':
        return None
    from timm.scheduler import create_scheduler_v2
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    milestones = [int(m * total_steps) for m in cfg.decay_milestones]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=total_steps, updates_per_epoch=1, step_on_epochs=False,
        warmup_epochs=warmup, warmup_lr=cfg.lr * 0.01 if warmup else 0.0, min_lr=cfg.min_lr,
        decay_milestones=milestones, decay_epochs=milestones[0] if milestones else 30, decay_rate=cfg.decay_rate,
        cooldown_epochs=0)
    return scheduler


# ---- loss ----------------------------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch; T^2 keeps the gradient scale of
    the soft targets independent of T (Hinton et al., 2015)."""
    t = temperature
    log_p_student = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    return nn.functional.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * (t * t)


def stage_loss(model, x, y, cfg: TrainConfig, ce_fn, rl_weight: Optional[float] = None,
               teacher_logits: Optional[torch.Tensor] = None, budget=None) -> Dict[str, torch.Tensor]:
    """The objective of ``cfg.stage``; returns the loss and what to log. ``rl_weight`` overrides ``cfg.rl_weight``
    (0 during ``--rl-warmup-epochs``). With ``teacher_logits`` the mean CE term is replaced by
    (1 - w) CE + w KD; the rl reward keeps the per-image CE. ``budget`` (a rewards.MacsBudget, needed with
    ``--target-macs``) replaces the skip reward and adds ``macs_share``, the batch's mean sampled MACs / full MACs."""
    from .rewards import hybrid_rl_loss
    if cfg.stage == 'base':
        logits = model(x, gate_policy='open')
        loss = ce = ce_fn(logits, y).mean()
        out = dict(exec_rate=torch.ones((), device=x.device))
    else:
        trace = model(x, gate_policy=STAGE_POLICY[cfg.stage], return_trace=True)
        logits = trace.logits
        out = dict(exec_rate=trace.actions.mean())
        if cfg.stage in ('sp', 'ft'):
            loss = ce = ce_fn(logits, y).mean()
        else:
            rl_weight = cfg.rl_weight if rl_weight is None else rl_weight
            if bool(cfg.target_macs) != (budget is not None):
                raise ValueError('--target-macs and the budget passed to stage_loss go together: build it with '
                                 'MacsBudget.from_target(table, cfg.target_macs), or pass neither.')
            loss, ce, rl = hybrid_rl_loss(logits, y, trace.actions, trace.log_probs,
                                          alpha=0.0 if budget is not None else cfg.alpha, beta=cfg.beta,
                                          gamma=cfg.gamma, rl_weight=rl_weight, baseline=cfg.rl_baseline,
                                          ce_fn=ce_fn, probs=trace.probs, entropy_weight=cfg.rl_entropy,
                                          budget=budget)
            out['rl'] = rl.detach()
            if budget is not None:
                out['macs_share'] = budget.image_macs(trace.actions).mean() / budget.full_macs
    if teacher_logits is not None:
        kd = distillation_loss(logits, teacher_logits, cfg.distill_temperature)
        loss = loss + cfg.distill_weight * (kd - ce)  # = (1 - w) CE + w KD (+ the rl term)
        out['kd'] = kd.detach()
    out.update(loss=loss, ce=ce.detach())
    return out


def build_teacher(cfg: TrainConfig, arch: str, model_args: Dict[str, Any], device) -> Optional[nn.Module]:
    """The frozen ``--distill-from`` network (same architecture, eval mode, gates as ``--distill-gates``), or None."""
    if not cfg.distill_from:
        return None
    if cfg.distill_gates not in ('open', 'greedy'):
        raise ValueError(f"--distill-gates must be 'open' (a ResNet teacher) or 'greedy' (a SkipNet teacher running "
                         f"its own gates), got {cfg.distill_gates!r}.")
    if not 0.0 <= cfg.distill_weight <= 1.0 or cfg.distill_temperature <= 0:
        raise ValueError(f'--distill-weight must be in [0, 1] and --distill-temperature > 0, got '
                         f'{cfg.distill_weight} and {cfg.distill_temperature}.')
    import timm

    from .loading import load_weights
    teacher = timm.create_model(arch, **model_args)
    load_weights(teacher, weights_path(cfg.distill_from))
    return teacher.requires_grad_(False).eval().to(device)


def check_numbers(cfg: TrainConfig) -> None:
    """Settings no run can use, refused before any work (a batch of 0 would divide by zero, a negative one be
    blamed on the sample count; a negative skip reward trains gates to run every block, silently)."""
    for name in ('batch_size', 'grad_accum_steps', 'log_every', 'checkpoint_every'):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    for name in ('steps', 'train_num_samples', 'eval_num_samples'):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (or unset), got {getattr(cfg, name)}.")
    if cfg.epochs < 1 and cfg.steps is None:
        raise ValueError(f'--epochs must be at least 1 (or pass --steps), got {cfg.epochs}.')
    if cfg.alpha < 0:
        raise ValueError(f'--alpha is the reward for skipping a block and must be >= 0 (0: accuracy only), got '
                         f'{cfg.alpha}.')
    check_target_macs(cfg)


def check_target_macs(cfg: TrainConfig) -> None:
    """``--target-macs`` and its multiplier's settings, refused before any work; the budget's range is checked
    against the model's MAC table once it is measured (rewards.MacsBudget.from_target)."""
    from .rewards import parse_target_macs
    settings = dict(init=cfg.macs_lambda_init, lr=cfg.macs_lambda_lr, kp=cfg.macs_lambda_kp)
    bad = {k: v for k, v in settings.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError('--macs-lambda-init, --macs-lambda-lr and --macs-lambda-kp must be finite and >= 0 (a '
                         'negative price would reward running blocks), got '
                         + ', '.join(f'--macs-lambda-{k} {v}' for k, v in bad.items()) + '.')
    if not cfg.target_macs:
        return
    if cfg.stage != 'rl':
        raise ValueError(f'--target-macs trains the gates with REINFORCE: use it with --stage rl, not '
                         f'--stage {cfg.stage}.')
    if cfg.alpha != TrainConfig.alpha:
        raise ValueError(f'--target-macs replaces the skip reward: drop --alpha {cfg.alpha} (the budget and its '
                         f'multiplier set how much the gates skip).')
    parse_target_macs(cfg.target_macs)


# ---- weight averaging ----------------------------------------------------------------------------------------------
def check_ema_settings(cfg: TrainConfig) -> None:
    if cfg.model_ema_update_bn < 0:
        raise ValueError(f'--model-ema-update-bn is a number of training images (0: off), got '
                         f'{cfg.model_ema_update_bn}.')
    if not cfg.model_ema:
        if cfg.model_ema_update_bn:
            raise ValueError('--model-ema-update-bn recomputes the BatchNorm statistics of the weight average: add '
                             '--model-ema (SWA: --model-ema-decay 1 --model-ema-warmup --model-ema-warmup-power 1).')
        return
    if not 0.0 < cfg.model_ema_decay <= 1.0 or cfg.model_ema_warmup_power <= 0:
        raise ValueError(f'--model-ema-decay must be in (0, 1] and --model-ema-warmup-power > 0, got '
                         f'{cfg.model_ema_decay} and {cfg.model_ema_warmup_power}.')
    if cfg.model_ema_decay == 1.0 and not cfg.model_ema_warmup:
        raise ValueError('--model-ema-decay 1 without --model-ema-warmup never moves the average: add '
                         '--model-ema-warmup (with --model-ema-warmup-power 1 it is the plain average of all updates).')


def build_ema(cfg: TrainConfig, model: nn.Module):
    """timm's ModelEmaV3 of ``model`` (already on its device), or None without ``--model-ema``."""
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup,
                      warmup_power=cfg.model_ema_warmup_power)


def _save_ema(ema, folder: str, bn_updated: Optional[nn.Module] = None) -> None:
    from safetensors.torch import save_model
    save_model(ema.module, os.path.join(folder, EMA_FILE))
    if bn_updated is not None:
        save_model(bn_updated, os.path.join(folder, EMA_BN_FILE))


@torch.no_grad()
def update_bn(model: nn.Module, batches, gate_policy: str = 'greedy', keep_gates: bool = False,
              autocast=None) -> int:
    """``torch.optim.swa_utils.update_bn`` for a SkipNet: reset every BatchNorm's running statistics, set its
    momentum to None (a cumulative mean over the batches), run ``batches`` in train mode, restore momenta and mode.

    A weight average (SWA, ``--model-ema``) also averages the running statistics, which then belong to no network:
    the statistics of the averaged weights are measured instead (Izmailov et al., 2018). Gates run ``gate_policy``
    with the model's execution (dense in the trainer, as training normalised every block over the whole batch).
    ``keep_gates``: the gates' own BatchNorm (ff gates) keeps its statistics, for stages that froze the gates.
    Returns the number of images seen."""
    import contextlib
    prefix = 'gates.'
    bns = [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and not (keep_gates and name.startswith(prefix))]
    was_training, momenta, seen = model.training, {m: m.momentum for m in bns}, 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        if keep_gates:
            model.gates.eval()
        for x in batches:
            with autocast() if autocast is not None else contextlib.nullcontext():
                model(x, gate_policy=gate_policy)
            seen += x.shape[0]
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    if bns and not seen:
        raise RuntimeError('--model-ema-update-bn saw no training image: check the training split.')
    return seen


def _load_ema(ema, ckpt: str) -> None:
    """Restore the average saved beside a checkpoint; a run cannot switch ``--model-ema`` on or off midway."""
    path = os.path.join(ckpt, EMA_FILE)
    if ema is None:
        if os.path.exists(path):
            raise ValueError(f'{ckpt} was trained with --model-ema: resume it with --model-ema.')
        return
    if not os.path.exists(path):
        raise ValueError(f'{ckpt} has no {EMA_FILE}: it was trained without --model-ema, resume it without.')
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    try:
        load_model(ema.module, path, device=str(next(ema.module.parameters()).device))
    except SafetensorError as e:
        raise ValueError(f'{path} is not a readable safetensors file ({e}): it is truncated or corrupt; resume from '
                         f'an earlier checkpoint.') from e


# ---- the run -------------------------------------------------------------------------------------------------------
# the settings that fix what an update and an epoch are: resuming with others would silently change the schedule
SCHEDULE_KEYS = ('batch_size', 'grad_accum_steps', 'train_num_samples', 'epochs', 'steps', 'sched', 'lr')
# the budget and its multiplier's step: a resumed run with others would chase another target with the old lambda
BUDGET_KEYS = ('target_macs', 'macs_lambda_lr', 'macs_lambda_kp')


# at a constant learning rate (--sched none) nothing depends on the run's length: a finished run may be extended
EXTENDABLE_KEYS = ('epochs', 'steps')


def _check_same_schedule(saved: Dict[str, Any], cfg: 'TrainConfig', ckpt: str) -> None:
    changed = {k: (saved[k], getattr(cfg, k)) for k in SCHEDULE_KEYS + BUDGET_KEYS
               if k in saved and saved[k] != getattr(cfg, k)}
    if cfg.sched == 'none' and saved.get('sched') == 'none':
        changed = {k: v for k, v in changed.items() if k not in EXTENDABLE_KEYS}
    if changed:
        diff = ', '.join(f'--{k.replace("_", "-")} {old!r} (now {new!r})' for k, (old, new) in changed.items())
        raise ValueError(f'{ckpt} was trained with {diff}; resume with the same settings (or start a new --output).')


def train(cfg: TrainConfig) -> Dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from timm.optim import create_optimizer_v2
    from tqdm.auto import tqdm

    from .accounting import measure_mac_table
    from .data import DataSpec, build_transforms, make_loader
    from .evaluation import collect, format_summary, summarize
    from .export import export_folder
    from .rewards import MacsBudget

    if cfg.stage not in STAGE_POLICY:
        raise ValueError(f"--stage must be one of {list(STAGE_POLICY)}, got {cfg.stage!r}.")
    if cfg.rl_baseline not in ('none', 'batch_mean'):
        raise ValueError(f"--rl-baseline must be 'none' or 'batch_mean', got {cfg.rl_baseline!r}.")
    if cfg.amp not in ('no', 'fp16', 'bf16'):
        raise ValueError(f"--amp must be 'no', 'fp16' or 'bf16', got {cfg.amp!r}.")
    check_numbers(cfg)
    check_ema_settings(cfg)
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.amp, gradient_accumulation_steps=cfg.grad_accum_steps,
                              log_with=cfg.log_with or None, project_dir=cfg.output)
    set_seed(cfg.seed, device_specific=True)  # rank r uses seed + r: independent crops and gate samples
    os.makedirs(cfg.output, exist_ok=True)
    log = _Logger(cfg.output, accelerator)

    # data description and model
    spec = DataSpec(cfg.dataset, cfg.image_column, cfg.label_column, cfg.train_split, cfg.eval_split,
                    cfg.num_classes, cfg.train_num_samples, cfg.eval_num_samples).resolved()
    if spec.num_classes is None:
        raise ValueError(f'Unknown number of classes for {cfg.dataset}: pass --num-classes.')
    if spec.train_num_samples is None:
        raise ValueError(f'A stream has no length: pass --train-num-samples for {cfg.dataset}.')
    model, arch, model_args = build_model(cfg, spec.num_classes)
    model.set_execution('dense')  # training always runs every block (STE needs it; BN sees the whole batch)
    if cfg.stage in FROZEN_GATE_STAGES:
        model.gates.requires_grad_(False)  # the backbone only; also keeps DDP free of unused params
    mac_table = measure_mac_table(model)
    budget = MacsBudget.from_target(mac_table, cfg.target_macs, cfg.macs_lambda_init) if cfg.target_macs else None
    teacher = build_teacher(cfg, arch, model_args, accelerator.device)
    train_tf, eval_tf = build_transforms(model, True), build_transforms(model, False)

    # optimizer and schedule, counted in updates
    world = accelerator.num_processes
    steps_per_epoch = spec.train_num_samples // (cfg.batch_size * world * cfg.grad_accum_steps)
    if steps_per_epoch < 1:
        raise ValueError('train_num_samples is smaller than one global batch: lower --batch-size.')
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    rl_warmup_steps = int(round(cfg.rl_warmup_epochs * steps_per_epoch))
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scheduler = build_scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = build_ema(cfg, accelerator.unwrap_model(model, keep_fp32_wrapper=True))
    ce_fn = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing, reduction='none')
    # the same module, compiled for the training step only: evaluation and checkpoints use `model` itself
    train_forward = torch.compile(model) if cfg.compile else model

    global_step, reproducible = 0, True
    if cfg.resume:
        from .loading import read_json
        ckpt = resolve_checkpoint(cfg.resume)
        saved = read_json(os.path.join(ckpt, 'trainer_state.json'))
        accelerator.load_state(ckpt)
        reproducible = _restore_rng(accelerator, ckpt, cfg, log) and saved.get('reproducible', True)
        if saved['stage'] != cfg.stage:
            raise ValueError(f"{ckpt} is a '{saved['stage']}' checkpoint; resume it with --stage {saved['stage']}.")
        _check_same_schedule(saved.get('config', {}), cfg, ckpt)
        if saved.get('num_processes', world) != world:
            raise ValueError(f"{ckpt} was trained on {saved['num_processes']} process(es), this run has {world}: "
                             f'resume with the same number (accelerate launch --num_processes).')
        global_step = saved['global_step']
        _restore_multiplier(budget, saved, ckpt)
        _load_ema(ema, ckpt)
        log.info(f'resumed from {ckpt} at update {global_step}')
    accelerator.init_trackers('skipnet', config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})
    log.info(f'{cfg.stage}: {arch} {model_args}, {world} process(es), {steps_per_epoch} updates/epoch, '
             f'{total_steps} updates, {mac_table.full_macs / 1e6:.1f} MMACs full')
    if budget is not None:
        log.info(f'budget: {budget.target_macs / 1e6:.2f} MMACs per image ({budget.target_share:.1%} of full), '
                 f'multiplier {budget.multiplier:.4g}, dual step {cfg.macs_lambda_lr:g}, '
                 f'proportional gain {cfg.macs_lambda_kp:g}')

    def save(final: bool = False, bn_updated: Optional[nn.Module] = None) -> str:
        state = dict(global_step=global_step, stage=cfg.stage, arch=arch, model_args=model_args,
                     config=dataclasses.asdict(cfg), num_processes=world, final=final, reproducible=reproducible)
        if budget is not None:
            state['macs_multiplier'] = budget.multiplier  # a JSON float round-trips exactly
            state['macs_integral'] = budget.integral
        return save_checkpoint(accelerator, cfg.output, state, cfg.keep_checkpoints,
                               write_extra=None if ema is None else lambda d: _save_ema(ema, d, bn_updated))

    def evaluate(tag: str, net=None) -> Dict[str, Any]:
        _broadcast_buffers(accelerator, accelerator.unwrap_model(net if net is not None else model))
        loader = make_loader(spec, spec.eval_split, eval_tf, cfg.batch_size, rank=accelerator.process_index,
                             world_size=world, limit=_per_rank(spec.eval_num_samples, world))
        summary = summarize(collect(net if net is not None else model, loader, accelerator,
                                    progress=accelerator.is_local_main_process), mac_table,
                            target_macs=None if budget is None else budget.target_macs)
        summary.update(stage=cfg.stage, global_step=global_step, model=arch, model_args=model_args)
        if budget is not None:
            summary['macs_lambda'] = budget.multiplier
        if accelerator.is_main_process:
            atomic_write_text(os.path.join(cfg.output, f'eval_{tag}.json'), json.dumps(summary, indent=2))
        log.info(f'eval ({tag}, update {global_step}):\n' + format_summary(summary))
        accelerator.log({f'eval/{k}': v for k, v in summary.items() if isinstance(v, (int, float))},
                        step=global_step)
        return summary

    def train_mode() -> None:
        model.train()
        if cfg.stage in FROZEN_GATE_STAGES:
            accelerator.unwrap_model(model).gates.eval()  # frozen gates: their BatchNorm (ff gates) must not drift

    # the loop
    train_mode()
    bar = tqdm(total=total_steps, initial=global_step, desc=cfg.stage, disable=not accelerator.is_local_main_process)
    samples, bad_images, t0, window = 0, 0, time.perf_counter(), []
    while global_step < total_steps:
        epoch, start = divmod(global_step, steps_per_epoch)
        per_batch = cfg.batch_size * cfg.grad_accum_steps
        # DataLoader workers each read their own shards: resuming mid-epoch reads in one process to keep the order
        loader = make_loader(spec, spec.train_split, train_tf, cfg.batch_size, rank=accelerator.process_index,
                             world_size=world, shuffle=True, seed=cfg.seed, epoch=epoch, skip=start * per_batch,
                             shuffle_buffer=cfg.shuffle_buffer, workers=0 if start else cfg.workers,
                             shard_for_workers=cfg.workers)
        batches = iter(loader)
        for _ in range(start, steps_per_epoch):
            if global_step >= total_steps:
                break
            if scheduler is not None:
                scheduler.step_update(global_step)
            rl_on = global_step >= rl_warmup_steps
            share_sum, share_n = 0.0, 0  # the update's sampled MACs shares, for the multiplier
            for _micro in range(cfg.grad_accum_steps):
                x, y, n_bad = next(batches, (None, None, -1))
                # every rank takes the same branch, or DDP's all-reduce would wait forever
                ended, empty = _any_rank(accelerator, n_bad < 0), _any_rank(accelerator, x is None)
                if ended:
                    raise RuntimeError(
                        f'The training stream of rank {accelerator.process_index} ended before update {global_step} '
                        f'of epoch {epoch} ({steps_per_epoch} updates per epoch from --train-num-samples '
                        f'{spec.train_num_samples}): lower --train-num-samples to the real split size.')
                bad_images += n_bad
                if empty:
                    continue  # a micro-batch of only undecodable images on some rank: all ranks skip it
                x, y = x.to(accelerator.device), y.to(accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        teacher_logits = None
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(x, gate_policy=cfg.distill_gates)
                        out = stage_loss(train_forward, x, y, cfg, ce_fn, teacher_logits=teacher_logits,
                                         rl_weight=cfg.rl_weight if rl_on else 0.0, budget=budget)
                    accelerator.backward(out['loss'])
                    if accelerator.sync_gradients and cfg.clip_grad:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad()
                samples += x.shape[0]
                window.append({k: v.item() for k, v in out.items()})
                if budget is not None:
                    share_sum, share_n = share_sum + window[-1]['macs_share'] * x.shape[0], share_n + x.shape[0]
            if budget is not None and rl_on:  # the price holds still while --rl-warmup-epochs keeps REINFORCE off
                mean_share = _global_mean(accelerator, share_sum, share_n)
                if mean_share is not None:
                    budget.update(mean_share, cfg.macs_lambda_lr, cfg.macs_lambda_kp)
            global_step += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=global_step)
            bar.update(1)
            if global_step % cfg.log_every == 0 or global_step == total_steps:
                dt = time.perf_counter() - t0
                metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]} if window else {}
                metrics.update(lr=optimizer.param_groups[0]['lr'], img_per_s=samples * world / dt,
                               bad_images=bad_images, epoch=epoch)
                if budget is not None:  # macs_share: this rank's window mean; the multiplier after the update
                    metrics.update(macs_lambda=budget.multiplier, macs_target=budget.target_share)
                bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()
                                 if k in ('loss', 'exec_rate', 'lr', 'macs_share', 'macs_lambda')})
                log.metrics(global_step, metrics)
                accelerator.log({f'train/{k}': v for k, v in metrics.items()}, step=global_step)
                samples, t0, window = 0, time.perf_counter(), []
            if global_step % cfg.checkpoint_every == 0 and global_step < total_steps:
                save()
        if cfg.eval_every_epochs and (epoch + 1) % cfg.eval_every_epochs == 0 and global_step < total_steps:
            evaluate(f'{cfg.stage}_epoch{epoch + 1}')
            if ema is not None:
                evaluate(f'{cfg.stage}_ema_epoch{epoch + 1}', ema.module)
            train_mode()
    bar.close()
    if bad_images:
        log.info(f'{bad_images} undecodable training images were skipped')
    bn_updated = None
    if cfg.model_ema_update_bn:  # the average with its own BatchNorm statistics is what the run delivers
        bn_updated = _ema_with_updated_bn(ema, cfg, spec, train_tf, accelerator, epoch=total_steps // steps_per_epoch)
        log.info(f'recomputed the BatchNorm statistics of the average on {cfg.model_ema_update_bn} training images')
    ckpt = save(final=True, bn_updated=bn_updated)
    if ema is None:
        summary, final_net = evaluate(cfg.stage), accelerator.unwrap_model(model)
    else:  # the average is what the run delivers; the raw weights are kept for comparison
        evaluate(f'{cfg.stage}_no_ema')
        final_net = ema.module if bn_updated is None else bn_updated
        summary = evaluate(cfg.stage, final_net)
    if cfg.export and accelerator.is_main_process:
        folder = export_folder(final_net, os.path.join(cfg.output, 'model'), model_args,
                               eval_summary=summary, train_config=dataclasses.asdict(cfg))
        log.info(f'exported {folder} (reload: timm.create_model("local-dir:{os.path.abspath(folder)}"))')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary['checkpoint'] = ckpt
    return summary


def _restore_rng(accelerator, ckpt: str, cfg: TrainConfig, log) -> bool:
    """Put back every process's random state from the checkpoint; True when the resumed run stays reproducible.
    Without one (an older checkpoint whose Accelerate pickle is missing or refused) the run is refused, or with
    ``--resume-without-rng-state`` continued with a loud warning."""
    rank = accelerator.process_index
    problem = None if restore_rng_state(ckpt, rank) else accelerate_rng_problem(ckpt, rank)
    if not _any_rank(accelerator, problem is not None):
        return True
    problem = problem or 'another process lost its random state'
    message = (f'{ckpt} cannot restore the random state of process {rank}: {problem} (and it has no '
               f'{RNG_FILE.format(rank)}). Resumed from it, data augmentation, gate sampling and drop path diverge '
               f'from the uninterrupted run.')
    if not cfg.resume_without_rng_state:
        raise ValueError(message + ' Resume from a complete checkpoint, or pass --resume-without-rng-state to go on '
                                   'anyway (the run is then recorded as not reproducible).')
    import warnings
    warnings.warn(message + ' Going on (--resume-without-rng-state); the checkpoints record "reproducible": false.',
                  stacklevel=3)
    log.info(f'WARNING: {problem}: this run no longer reproduces an uninterrupted one')
    return False


def _ema_with_updated_bn(ema, cfg: TrainConfig, spec, transform, accelerator, epoch: int) -> nn.Module:
    """A copy of the average with BatchNorm statistics measured on ``--model-ema-update-bn`` training images (each
    process its share, then averaged across processes); the average itself keeps going unchanged if resumed."""
    import copy

    from .data import make_loader
    world = accelerator.num_processes
    net = copy.deepcopy(ema.module)
    loader = make_loader(spec, spec.train_split, transform, cfg.batch_size, rank=accelerator.process_index,
                         world_size=world, shuffle=True, seed=cfg.seed, epoch=epoch,
                         limit=_per_rank(cfg.model_ema_update_bn, world), shuffle_buffer=cfg.shuffle_buffer,
                         workers=cfg.workers)
    batches = (x.to(accelerator.device) for x, _, _ in loader if x is not None)
    update_bn(net, batches, gate_policy='open' if cfg.stage == 'base' else 'greedy',
              keep_gates=cfg.stage in FROZEN_GATE_STAGES, autocast=accelerator.autocast)
    if world > 1:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(accelerator.reduce(m.running_mean, reduction='mean'))
                m.running_var.copy_(accelerator.reduce(m.running_var, reduction='mean'))
    return net.eval()


def _restore_multiplier(budget, saved: Dict[str, Any], ckpt: str) -> None:
    """Put the checkpoint's Lagrange multiplier back; a run cannot switch --target-macs on or off midway."""
    had = saved.get('config', {}).get('target_macs') or ''
    if budget is None:
        if had or 'macs_multiplier' in saved:
            raise ValueError(f'{ckpt} was trained with --target-macs {had}: resume it with the same --target-macs.')
        return
    if 'macs_multiplier' not in saved:
        raise ValueError(f'{ckpt} was trained without --target-macs (no multiplier saved): resume it without, or '
                         f'start a budget run from its weights with --initial-checkpoint.')
    budget.multiplier = float(saved['macs_multiplier'])
    budget.integral = float(saved.get('macs_integral', budget.multiplier))  # without a P term they are equal


def _global_mean(accelerator, total: float, count: int) -> Optional[float]:
    """sum / count over every process (float64), so all ranks step the multiplier alike; None without images."""
    if accelerator.num_processes > 1:
        t = accelerator.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=accelerator.device),
                               reduction='sum')
        total, count = t[0].item(), t[1].item()
    return total / count if count else None


def _broadcast_buffers(accelerator, net: nn.Module) -> None:
    """Rank 0's buffers on every rank. DDP sends them at the start of each training forward, so after the last one
    every rank holds BatchNorm statistics of its own batches: a gathered evaluation would mix models, and rank 0's
    (the one saved and exported) would not be the one evaluated on the other ranks' images."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist
        for buffer in net.buffers():
            dist.broadcast(buffer.data, src=0)


def _any_rank(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction='sum').item() > 0)


def _per_rank(n: Optional[int], world: int) -> Optional[int]:
    return None if n is None else math.ceil(n / world)


class _Logger:
    """Main-process console lines plus ``log.jsonl`` (one JSON object per logged update)."""

    def __init__(self, output: str, accelerator):
        self.path = os.path.join(output, 'log.jsonl')
        self.main = accelerator.is_main_process

    def info(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def metrics(self, step: int, metrics: Dict[str, float]) -> None:
        if self.main:
            with open(self.path, 'a') as f:
                f.write(json.dumps(dict(step=step, time=time.time(), **metrics)) + '\n')


def main(argv=None) -> Dict[str, Any]:
    return train(parse_config(argv))


def add_parser(sub) -> None:
    p = sub.add_parser('train', help='train a SkipNet stage (base | sp | rl | ft); same flags as examples/finetune.py')
    build_arg_parser(p)
    p.set_defaults(func=lambda args: train(_config_with_yaml(args)))


def _config_with_yaml(args) -> TrainConfig:
    if args.config:  # the YAML file sets defaults under the flags: parse this subcommand's own arguments again
        return parse_config(args.argv[1:])
    return config_from_args(args)
