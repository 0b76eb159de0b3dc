"""Model cards in timm's layout (Model Details, Usage, Results, Training, Limitations, Citation), filled only from
the folder's config and a measured evaluation summary."""
import json
import math
import os
from typing import Dict, Optional

from .checkpoints import atomic_write_text

CITATION = """@inproceedings{wang2018skipnet,
  title     = {SkipNet: Learning Dynamic Routing in Convolutional Networks},
  author    = {Wang, Xin and Yu, Fisher and Dou, Zi-Yi and Darrell, Trevor and Gonzalez, Joseph E.},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2018}
}"""


def write_model_card(folder: str, eval_summary: Optional[Dict] = None, train_config: Optional[Dict] = None,
                     repo_id: Optional[str] = None, extra: str = '', dataset: Optional[str] = None) -> str:
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    arch = config['architecture']
    args = config.get('model_args', {})
    pcfg = config.get('pretrained_cfg', {})
    name = repo_id or os.path.basename(os.path.abspath(folder))
    params = _num_params(folder)
    s = eval_summary or {}
    dataset = dataset or (train_config or {}).get('dataset') or s.get('dataset') or 'not stated'
    lines = [
        '---', 'tags:', '- image-classification', '- timm', '- skipnet', 'library_name: timm', 'license: apache-2.0',
        'pipeline_tag: image-classification', '---', f'# Model card for {name}', '',
        'A SkipNet (Wang et al., ECCV 2018): a ResNet whose residual blocks each have a small gate that decides, per '
        'image, whether the block runs. Skipped blocks cost nothing at inference (real gather/scatter skipping).',
        '', '## Model Details', '',
        '- **Model Type:** Image classification / feature backbone with dynamic depth',
        f'- **Architecture:** `{arch}` with `{json.dumps(args)}`',
        '- **Model Stats:**',
        f'  - Params (M): {params / 1e6:.3f}' if params else '  - Params (M): n/a',
        f"  - Image size: {pcfg.get('input_size', [0])[-1]} x {pcfg.get('input_size', [0])[-1]}",
    ]
    if s:
        lines += [f"  - GMACs, full network (all blocks): {s['gmacs_full']:.4f}",
                  f"  - GMACs, measured dynamic mean on {s['num_images']} test images: {s['gmacs_mean']:.4f} "
                  f"({s['macs_reduction_pct']:.1f} % fewer, exact count incl. gates)"]
    lines += ['- **Papers:**', '  - SkipNet: Learning Dynamic Routing in Convolutional Networks: '
              'https://arxiv.org/abs/1711.09485', f'- **Dataset:** {dataset}', '',
              '## Model Usage', '', '```python', '# pip install timm-skipnet', 'import timm_skipnet  # registers the '
              'SkipNet architectures with timm', 'import timm, torch', '',
              *([f'model = timm.create_model("hf-hub:{name}", pretrained=True).eval()',
                 '# offline, from a local copy of these files (e.g. hub_configs/ in the timm-skipnet repository):',
                 f'# model = timm.create_model("local-dir:/path/to/{name.split("/")[-1]}", pretrained=True).eval()']
                if '/' in name else
                [f'model = timm.create_model("local-dir:/path/to/{name}", pretrained=True).eval()']),
              'cfg = timm.data.resolve_model_data_config(model)',
              'transform = timm.data.create_transform(**cfg, is_training=False)',
              'logits = model(transform(img).unsqueeze(0))  # img: a PIL image',
              'trace = model.forward_with_gates(transform(img).unsqueeze(0))',
              'print(trace.executed_blocks)  # blocks this image ran', '```', '']
    if s:
        rates = ', '.join(f'{r:.2f}' for r in s['gate_execution_rates'])
        lines += ['## Results (measured)', '', '| metric | value |', '|---|---:|',
                  f"| test images | {s['num_images']} |", f"| top-1 (%) | {s['top1']:.2f} |",
                  f"| MACs / image, mean | {s['macs_mean'] / 1e6:.2f} M of {s['macs_full'] / 1e6:.2f} M |",
                  f"| MACs reduction (exact) | {s['macs_reduction_pct']:.1f} % |",
                  f"| paper's computation percentage | {s['computation_percentage']:.1f} % |",
                  f"| executed blocks / image | {s['executed_blocks_mean']:.2f} of {s['num_blocks']} |", '',
                  f'Per-gate execution rates: {rates}.', '']
    if train_config:
        lines += ['## Training', '', f"Stage `{train_config.get('stage')}` with timm-skipnet's trainer, config:", '',
                  '```json', json.dumps(train_config, indent=1, default=str), '```', '']
    if extra:
        lines += [extra, '']
    lines += ['## Limitations', '',
              '- Needs `import timm_skipnet` before `timm.create_model`; the Hub widget cannot run it.',
              '- Real skipping runs blocks on sub-batches: wall-clock gains depend on batch size and hardware '
              '(see the project\'s docs/performance.md); under `torch.compile(fullgraph=True)` it runs a static-shape '
              'path that still skips, sized by the gate capacity saved with the weights.',
              '- Accuracy and compute are measured on the stated test split only.', '',
              '## Citation', '', '```bibtex', CITATION, '```', '']
    path = os.path.join(folder, 'README.md')
    atomic_write_text(path, '\n'.join(lines))
    return path


def _num_params(folder: str) -> int:
    path = os.path.join(folder, 'model.safetensors')
    if not os.path.exists(path):
        return 0
    from safetensors import safe_open
    total = 0
    with safe_open(path, 'pt') as f:
        for k in f.keys():
            if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
                total += math.prod(f.get_slice(k).get_shape())
    return total
