"""Hugging Face Hub: turn a training run into a Hub-ready folder, and publish such a folder.

A folder holds exactly what its Hub repo will: ``config.json`` (timm's ``save_for_hf`` with explicit model_args),
``model.safetensors`` and a ``README.md`` model card, plus ``eval_results.json`` (the measurements behind the card).
``hub_configs/<arch>.<tag>/`` in this repository are such folders.
"""
import os
from typing import Dict, Optional

from . import __version__
from .export import export_folder

REQUIRED_FILES = ('config.json', 'model.safetensors', 'README.md')


def _read_json(path: str) -> Dict:
    from .loading import read_json
    return read_json(path)


def find_run_files(run_or_checkpoint: str) -> Dict[str, Optional[str]]:
    """Locate the weights, trainer state and evaluation JSON of a run dir, a checkpoint dir or an exported folder."""
    from .checkpoints import EMA_BN_FILE, EMA_FILE, resolve_checkpoint
    path = os.path.abspath(run_or_checkpoint)
    if os.path.exists(os.path.join(path, 'config.json')) and os.path.exists(os.path.join(path, 'model.safetensors')):
        evals = os.path.join(path, 'eval_results.json')
        return dict(weights=os.path.join(path, 'model.safetensors'), state=None,
                    config=os.path.join(path, 'config.json'), eval=evals if os.path.exists(evals) else None)
    ckpt = resolve_checkpoint(path)
    state = os.path.join(ckpt, 'trainer_state.json')
    stage = _read_json(state)['stage']
    run_dir = os.path.dirname(os.path.dirname(ckpt))
    evals = os.path.join(run_dir, f'eval_{stage}.json')
    # a run trained with --model-ema delivers (exports, evaluates as eval_<stage>.json) the average, not the raw
    # weights; with --model-ema-update-bn, the average with its BatchNorm statistics recomputed
    candidates = [os.path.join(ckpt, n) for n in (EMA_BN_FILE, EMA_FILE)]
    weights = next((c for c in candidates if os.path.exists(c)), os.path.join(ckpt, 'model.safetensors'))
    return dict(weights=weights, state=state, config=None,
                eval=evals if os.path.exists(evals) else None)


def export_run(run_or_checkpoint: str, folder: str, repo_id: Optional[str] = None,
               eval_json: Optional[str] = None, card_extra: str = '') -> str:
    """``timm-skipnet export``: a Hub-ready folder from a trainer run / checkpoint (or re-export a folder)."""
    import timm

    from .loading import load_weights
    files = find_run_files(run_or_checkpoint)
    train_config = None
    if files['state']:
        state = _read_json(files['state'])
        arch, model_args, train_config = state['arch'], state['model_args'], state['config']
    else:
        config = _read_json(files['config'])
        arch, model_args = config['architecture'], config.get('model_args', {})
    model = timm.create_model(arch, **model_args)
    load_weights(model, files['weights'])
    eval_path = eval_json or files['eval']
    summary = _read_json(eval_path) if eval_path else None
    dataset = (summary or {}).get('dataset') or (train_config or {}).get('dataset')
    return export_folder(model.eval(), folder, model_args, eval_summary=summary, train_config=train_config,
                         repo_id=repo_id, dataset=dataset, card_extra=card_extra)


def check_folder(folder: str) -> Dict:
    """Refuse to publish a folder timm could not load: files present, architecture registered, cfg keys valid."""
    import timm
    from timm.models import PretrainedCfg

    import timm_skipnet  # noqa: F401
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f'{folder} lacks {missing}: create it with `timm-skipnet export` first.')
    config = _read_json(os.path.join(folder, 'config.json'))
    arch = config.get('architecture')
    if not arch or not timm.is_model(arch):
        raise ValueError(f"config.json names architecture {arch!r}, which is not a registered timm model.")
    extra = set(config.get('pretrained_cfg', {})) - set(PretrainedCfg.__dataclass_fields__)
    if extra:
        raise ValueError(f'config.json pretrained_cfg has non-timm keys {sorted(extra)}; timm would refuse it. '
                         f'Move architecture arguments to model_args.')
    timm.create_model(f'local-dir:{os.path.abspath(folder)}', pretrained=True)  # weights and config agree
    return config


def publish(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False,
            commit_message: str = 'Add SkipNet weights') -> str:
    """Upload a checked Hub-ready folder to ``repo_id`` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi
    check_folder(folder)
    api = HfApi(token=token, library_name='timm-skipnet')
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message)
    return str(info)


def write_hub_config(name: str, folder: str) -> str:
    """config.json of a registered ``arch.tag`` as timm's ``save_for_hf`` writes it (for a folder without weights
    yet, or to check one). Architecture kwargs come from the tag's entrypoint defaults."""
    import timm
    from timm.models._hub import save_config_for_hf  # timm's own config writer (not re-exported)
    model = timm.create_model(name)
    os.makedirs(folder, exist_ok=True)
    args = dict(num_classes=model.num_classes, gate_type=model.gate_type)
    path = os.path.join(folder, 'config.json')
    save_config_for_hf(model, path, model_args=args, model_config={'skipnet_version': __version__})
    return path


def _export_main(args) -> None:
    folder = export_run(args.run, args.output, repo_id=args.repo_id or None, eval_json=args.eval_json or None)
    print(f'wrote {folder}: ' + ', '.join(sorted(os.listdir(folder))))


def _publish_main(args) -> None:
    print(publish(args.folder, args.repo_id, token=args.token or None, private=args.private))


def add_parser(sub) -> None:
    p = sub.add_parser('export', help='write a Hub-ready folder (config.json, model.safetensors, README.md card) '
                                      'from a training run or checkpoint')
    p.add_argument('run', help='run output dir, checkpoint dir, or an exported folder')
    p.add_argument('--output', required=True, help='folder to write, e.g. hub_configs/<arch>.<tag>')
    p.add_argument('--repo-id', default='', help='Hub repo id used in the card usage snippet')
    p.add_argument('--eval-json', default='', help='evaluation summary for the card (default: the run\'s)')
    p.set_defaults(func=_export_main)
    p = sub.add_parser('publish', help='upload a Hub-ready folder with huggingface_hub')
    p.add_argument('folder')
    p.add_argument('repo_id', help='e.g. timm-skipnet/skipnet_resnet38_cifar.cifar10')
    p.add_argument('--token', default='', help='default: the logged-in token (huggingface-cli login / HF_TOKEN)')
    p.add_argument('--private', action='store_true')
    p.set_defaults(func=_publish_main)
