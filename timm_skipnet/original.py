"""Convert checkpoints released with the original SkipNet code (``ucbdrive/skipnet``, PyTorch 0.2/0.3).

Those files are legacy-format pickles of ``DataParallel`` state_dicts in the original layout (``group{g}_layer{i}``,
duplicate ``group{g}_ds{i}``, per-block ``group{g}_gate{i}``, shared ``control.*``; reference §6). The converter maps
them onto our timm layout, checks the result against the target model key by key (a wrong depth or gate type fails
loudly instead of loading half a network), and exports a Hub-ready folder. Files are only ever read with
``weights_only=True``: a checkpoint found in a web archive must not be able to run code.
"""
import argparse
import os
import pickle
import re
from typing import Any

import torch
from timm.models import is_model

__all__ = ['convert_original_state_dict', 'load_original_checkpoint', 'convert_original_checkpoint', 'add_parser']

_BLOCK_KEY = re.compile(r'^group(\d+)_(layer|ds|gate)(\d+)\.(.+)$')
_ARCH = re.compile(r'^(?P<data>cifar10|cifar100|imagenet)_(?P<family>[a-z_]+?)_(?P<depth>\d+)$')
_LSTM = {f'control.rnn.{p}_l0': f'gates.lstm.{p}' for p in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')}


def _strip_module(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _layout(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What an original state_dict holds: blocks per stage, block type, gate type, classes (for inference and
    error messages)."""
    blocks: dict[int, set] = {}
    for k in state_dict:
        m = _BLOCK_KEY.match(k)
        if m and m.group(2) == 'layer':
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(3)))
    layers = tuple(max(blocks[g]) + 1 for g in sorted(blocks))
    gate_keys = [k for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(2) == 'gate']
    if any(k.startswith('control.rnn.') for k in state_dict):
        gate_type = 'rnn'
    elif any('.linear_layer.' in k for k in gate_keys):
        gate_type = 'ff1' if any('.conv2.' in k for k in gate_keys) else 'ff2'
    else:
        gate_type = None
    fc = state_dict.get('fc.weight')
    bottleneck = any(re.match(r'^group\d+_layer\d+\.conv3\.', k) for k in state_dict)
    return dict(layers=layers, block='Bottleneck' if bottleneck else 'BasicBlock', gate_type=gate_type,
                num_classes=None if fc is None else int(fc.shape[0]))


def _describe_layout(layout: dict[str, Any]) -> str:
    return (f"{len(layout['layers'])} stages of {list(layout['layers'])} {layout['block']}s, "
            f"gate_type={layout['gate_type']!r}, num_classes={layout['num_classes']}")


def _describe_model(model) -> str:
    name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    stages = [getattr(model, s) for s in getattr(model, 'stage_names', [])]
    block = type(stages[0][0]).__name__ if stages and len(stages[0]) else '?'
    return (f"{name}: {len(stages)} stages of {[len(s) for s in stages]} {block}s, "
            f"gate_type={getattr(model, 'gate_type', None)!r}, num_classes={getattr(model, 'num_classes', None)}")


def _examples(keys: list[str], n: int = 4) -> str:
    more = f', ... ({len(keys)} in all)' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def _map_gate(rest: str, j: int, v: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One key of an original gate module -> our gate bank (``gates.embed.j`` or ``gates.gates.j``)."""
    if rest in ('1.weight', '1.bias'):  # RNN gate: Sequential(AvgPool2d, Conv2d(C, 10, 1)); the conv is a Linear
        return f'gates.embed.{j}.{rest[2:]}', v.flatten(1) if v.ndim == 4 else v
    if rest == 'linear_layer.weight':  # FF gate: 2 logits -> 1, softmax[1] == sigmoid(l1 - l0)
        return f'gates.gates.{j}.fc.weight', (v[1] - v[0]).reshape(1, -1)
    if rest == 'linear_layer.bias':
        return f'gates.gates.{j}.fc.bias', (v[1] - v[0]).reshape(1)
    return f'gates.gates.{j}.{rest}', v  # FF gate conv1/bn1/conv2/bn2: same names as ours


def convert_original_state_dict(state_dict: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Map an original SkipNet state_dict onto ``model``'s keys, checked against ``model.state_dict()``.

    ``group{g}_gate{i}`` of flat block k decides block k + 1, so it becomes our gate k; the last block's gate is
    dead weight in the original and is dropped. Raises ``ValueError`` (found vs. expected layout, example keys)
    unless every produced key exists in the model with the same shape and every model key is produced.
    """
    if isinstance(state_dict.get('state_dict'), dict):  # a whole original checkpoint
        state_dict = state_dict['state_dict']
    sd = _strip_module(state_dict)
    layout = _layout(sd)
    if not layout['layers']:
        raise ValueError('Not an original SkipNet checkpoint: no group{g}_layer{i}.* keys.')
    order = sorted({(int(m.group(1)), int(m.group(3))) for k in sd if (m := _BLOCK_KEY.match(k))
                    and m.group(2) == 'layer'})
    flat = {gi: k for k, gi in enumerate(order)}
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            g, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == 'layer':
                out[f'layer{g}.{i}.{rest}'] = v
            elif kind == 'ds':  # the same module object as the block's downsample: saved twice
                twin = sd.get(f'group{g}_layer{i}.downsample.{rest}')
                if twin is None or not torch.equal(twin, v):
                    raise ValueError(f'{key} should duplicate group{g}_layer{i}.downsample.{rest} but '
                                     f'{"it is missing" if twin is None else "they differ"}: corrupted checkpoint?')
            elif (g, i) not in flat:
                out[key] = v  # a gate without its block: left for the check below to report
            elif flat[(g, i)] < len(order) - 1:
                k, t = _map_gate(rest, flat[(g, i)], v)
                out[k] = t
        elif key in _LSTM:
            out[_LSTM[key]] = v
        elif key in ('control.proj.weight', 'control.proj.bias'):  # Linear (CIFAR) or Conv2d 1x1 (ImageNet)
            out[f'gates.head.{key.rsplit(".", 1)[1]}'] = v.reshape(1, -1) if key.endswith('weight') else v
        else:
            out[key] = v  # stem, head, and anything unexpected (reported below)
    for k in [k for k in out if k.endswith('.running_mean')]:  # BN buffers added in PyTorch 0.4.1
        out.setdefault(k[:-len('running_mean')] + 'num_batches_tracked', torch.tensor(0, dtype=torch.long))
    out.setdefault('gate_threshold_logits', torch.zeros(model.num_gated_blocks))  # the original's p > 0.5 rule
    for key in ('gate_capacity', 'gate_capacity_sigmas'):  # static execution: not calibrated (whole batch)
        out.setdefault(key, model.state_dict()[key].detach().cpu().clone())

    own = model.state_dict()
    unexpected = [k for k in out if k not in own]
    missing = [k for k in own if k not in out]
    shapes = [f'{k} {tuple(out[k].shape)} vs {tuple(own[k].shape)}' for k in out
              if k in own and out[k].shape != own[k].shape]
    if unexpected or missing or shapes:
        lines = ['The original SkipNet checkpoint does not fit the model.',
                 f'  found:    {_describe_layout(layout)}', f'  expected: {_describe_model(model)}']
        if unexpected:
            lines.append(f'  converted keys the model lacks: {_examples(unexpected)}')
        if missing:
            lines.append(f'  model keys the checkpoint lacks: {_examples(missing)}')
        if shapes:
            lines.append(f'  shape mismatches (checkpoint vs model): {_examples(shapes)}')
        raise ValueError('\n'.join(lines))
    return out


def _model_from_arch(arch: str) -> tuple[str, str] | None:
    """``(model name, gate_type)`` from an original factory name, typos included; None if not recognised."""
    m = _ARCH.match(arch)
    if not m:
        return None
    family, depth = m.group('family'), int(m.group('depth'))
    if family in ('rnn_gate', 'rnn_gate_rl'):
        gate_type = 'rnn'
    elif family.startswith('fee'):  # feedforward, feeforward, feedfoward_rl, feedford_rl, feedforward_rl
        gate_type = 'ff1' if depth <= 74 else 'ff2'  # the original factories: FFGate-II only at 110 layers
    elif family == 'resnet':
        raise ValueError(f'arch {arch!r} is a plain ResNet baseline, not a SkipNet; its keys are already in timm '
                         "layout: timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...)).")
    else:
        return None
    name = f"skipnet_resnet{depth}{'' if m.group('data') == 'imagenet' else '_cifar'}"
    if not is_model(name):
        raise ValueError(f'arch {arch!r} would be {name}, which timm-skipnet does not define.')
    return name, gate_type


def _model_from_layout(layout: dict[str, Any]) -> tuple[str, str]:
    from .skipnet import _CIFAR_DEPTHS, _IMAGENET_ARCHS
    layers, gate_type = layout['layers'], layout['gate_type']
    if gate_type is None:
        raise ValueError('Cannot tell the gate type: neither control.rnn.* nor group*_gate*.linear_layer.* keys.')
    if len(layers) == 3 and layout['block'] == 'BasicBlock' and len(set(layers)) == 1:
        depth = 6 * layers[0] + 2
        if depth in _CIFAR_DEPTHS:
            return f'skipnet_resnet{depth}_cifar', gate_type
    for name, (block, arch_layers, _) in _IMAGENET_ARCHS.items():
        if len(layers) == 4 and tuple(arch_layers) == layers and block.__name__ == layout['block']:
            return name, gate_type
    raise ValueError(f'No skipnet_* model has this layout: {_describe_layout(layout)}.')


def load_original_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an original ``.pth.tar`` safely; returns ``(state_dict, meta)``.

    ``meta`` holds ``arch``, ``best_prec1`` and ``iter`` / ``epoch`` when present, plus the target ``model_name``
    and ``model_args`` (``num_classes``, ``gate_type``), taken from ``arch`` or, without a known one, from the keys.
    """
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f'{path} contains non-tensor Python objects, and SkipNet refuses to unpickle them (that can run '
            'arbitrary code). Re-save only its state_dict from an environment you trust. Loader said: '
            f'{str(e).splitlines()[-1][:300]}') from e
    meta: dict[str, Any] = {}
    if isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict'), dict):
        for k in ('arch', 'best_prec1', 'iter', 'epoch'):
            if k in ckpt:
                v = ckpt[k]
                meta[k] = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        ckpt = ckpt['state_dict']
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f'{path} does not hold a state_dict (a dict of tensors), alone or under "state_dict".')
    state_dict = _strip_module(ckpt)
    layout = _layout(state_dict)
    if not layout['layers']:
        raise ValueError(f'{path} is not an original SkipNet checkpoint: no group{{g}}_layer{{i}}.* keys.')
    found = _model_from_arch(meta['arch']) if isinstance(meta.get('arch'), str) else None
    meta['inferred_from'] = 'arch' if found else 'keys'
    name, gate_type = found or _model_from_layout(layout)
    if layout['num_classes'] is None:
        raise ValueError(f'{path} has no fc.weight: cannot tell the number of classes.')
    meta.update(model_name=name, model_args=dict(num_classes=layout['num_classes'], gate_type=gate_type))
    return state_dict, meta


def convert_original_checkpoint(path: str, output_folder: str) -> str:
    """Original ``.pth.tar`` -> Hub-ready folder (config.json, model.safetensors, README.md); returns the folder.

    Reload with ``timm.create_model('local-dir:<folder>', pretrained=True)``.
    """
    return _convert(path, output_folder)[0]


def _convert(path: str, output_folder: str) -> tuple[str, dict[str, Any]]:
    import timm

    from .export import export_folder
    state_dict, meta = load_original_checkpoint(path)
    name, args = meta['model_name'], meta['model_args']
    note = f'Converted from the original ucbdrive/skipnet checkpoint {os.path.basename(path)}'
    if 'arch' in meta:
        note += f" (arch {meta['arch']}, best_prec1 {meta.get('best_prec1')})"
    # ImageNet: the .tv_in1k cfg is the original's preprocessing (resize 256, centre crop 224, bilinear)
    tag = name if name.endswith('_cifar') else f'{name}.tv_in1k'
    model = timm.create_model(tag, pretrained_cfg_overlay=dict(notes=(note,)), **args)
    try:
        converted = convert_original_state_dict(state_dict, model)
    except ValueError as e:
        source = f"its arch {meta['arch']!r}" if meta['inferred_from'] == 'arch' else 'its keys'
        raise ValueError(f'{path}: {e}\n  (the model {name} with {args} was chosen from {source})') from e
    model.load_state_dict(converted, strict=True)
    return export_folder(model.eval(), output_folder, model_args=args, card=True), meta


def _main(args: argparse.Namespace) -> None:
    output = args.output or os.path.basename(args.checkpoint).removesuffix('.tar').removesuffix('.pth')
    folder, meta = _convert(args.checkpoint, output)
    print(f"{args.checkpoint} ({meta.get('arch', 'no arch')}, best_prec1 {meta.get('best_prec1')}) -> {folder}: "
          f"{meta['model_name']} {meta['model_args']}")
    print(f"load with timm.create_model('local-dir:{os.path.abspath(folder)}', pretrained=True)")


def add_parser(sub) -> None:
    p = sub.add_parser('convert-original', help='convert an original ucbdrive/skipnet .pth.tar to a Hub-ready folder',
                       description='Convert a checkpoint released with the original SkipNet code (PyTorch 0.2/0.3, '
                                   'read with weights_only=True) to config.json + model.safetensors + README.md.')
    p.add_argument('checkpoint', help='original .pth.tar (e.g. resnet-110-rnn-sp-cifar10.pth.tar)')
    p.add_argument('--output', default='', help='output folder (default: the checkpoint name without .pth.tar)')
    p.set_defaults(func=_main)
