"""Build a SkipNet from any name users have for one, and load weights safely (never unpickling)."""
import os
import pickle
import re

import torch
import torch.nn as nn

from .skipnet import SkipNetResNet, checkpoint_filter_fn


def load_weights(model: nn.Module, path: str, strict: bool = True) -> None:
    """Safe weight loading: safetensors, or ``torch.load(weights_only=True)``; folders use their model.safetensors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'Weights not found: {path} (give a .safetensors / .pth file or an exported folder).')
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ('model.safetensors', 'pytorch_model.bin')]
        found = [c for c in candidates if os.path.exists(c)]
        if not found:
            raise FileNotFoundError(f'No model.safetensors or pytorch_model.bin in {path}.')
        path = found[0]
    state = read_state_dict(path)
    if not isinstance(state, dict):
        raise TypeError(f'{path} holds a {type(state).__name__}, expected a state dict of tensors.')
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=strict)


def refusal_message(path: str, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, without torch's advice to load it unsafely."""
    found = re.search(r'GLOBAL (\S+)', str(error))
    what = f' ({found.group(1)})' if found else ''
    return (f'{path} contains non-tensor Python objects{what}, and SkipNet refuses to unpickle them (that can run '
            'arbitrary code). Re-save only its state_dict (a dict of tensors), or export it as .safetensors, from an '
            'environment you trust.')


def read_state_dict(path: str):
    """The tensors of a ``.safetensors`` file or a weights-only torch file; errors name the file and say what to do."""
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except (SafetensorError, OSError) as e:
            raise ValueError(f'{path} is not a readable safetensors file ({e}): it is truncated or corrupt; copy, '
                             f'download or export it again.') from e
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(refusal_message(path, e)) from None  # torch's text suggests weights_only=False
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f'{path} is not a readable torch weights file ({type(e).__name__}: {e}): it is truncated, '
                         f'corrupt or not a checkpoint; copy or export it again.') from e


def read_json(path: str) -> dict:
    """A JSON file, with an error that names it (json's own says only 'line 1 column 1')."""
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid JSON ({e}): the file is truncated or corrupt; export or download it '
                         f'again.') from e


def _check_local_dir(name: str) -> None:
    """Read a ``local-dir:`` folder's files ourselves first, so a broken one is named (timm's errors do not)."""
    folder = name[len('local-dir:'):]
    config = os.path.join(folder, 'config.json')
    if not os.path.exists(config):
        raise FileNotFoundError(f'{config} not found: {name} must be a folder written by `timm-skipnet export`.')
    read_json(config)
    weights = os.path.join(folder, 'model.safetensors')
    if os.path.exists(weights):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(weights, framework='pt'):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f'{weights} is not a readable safetensors file ({e}): it is truncated or corrupt; export '
                             f'or download it again.') from e


def load_model(name: str, checkpoint: str = '', num_classes: int | None = None, pretrained: bool = False):
    """A SkipNet from a ``skipnet_*`` name, ``local-dir:`` / ``hf-hub:`` (with their own weights) or a plain timm
    ResNet name (converted); ``checkpoint`` (weights file or exported folder) is loaded on top."""
    import timm

    import timm_skipnet  # noqa: F401 -- registers the models

    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    if name.startswith('local-dir:'):
        _check_local_dir(name)
    if name.startswith(('local-dir:', 'hf-hub:')):
        model = timm.create_model(name, pretrained=True)  # the folder / repo's config fixes the classes
    elif name.startswith('skipnet_'):
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    else:
        model = timm.create_model('skipnet_from_timm', base_model=name, base_pretrained=pretrained, **kwargs)
    if not isinstance(model, SkipNetResNet):
        raise TypeError(f'{name} built a {type(model).__name__}, not a SkipNet.')
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def model_and_eval_loader(args, check_labels: bool = True):
    """The shared start of ``timm-skipnet eval`` / ``analyze``: the model on its device in eval mode and a loader of
    the evaluation split; returns ``(model, loader, spec, split)``. Labels outside the model's classes are an error
    (``check_labels``; off where labels are never read, e.g. threshold calibration on unlabelled images)."""
    if args.batch_size < 1:
        raise ValueError(f'--batch-size must be at least 1, got {args.batch_size}.')
    from .data import DataSpec, build_transforms, make_loader
    spec = DataSpec(args.dataset, image_column=args.image_column, label_column=args.label_column).resolved()
    split = args.split or spec.eval_split
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = load_model(args.model, args.checkpoint, args.num_classes or spec.num_classes, args.pretrained)
    model = model.to(device).eval()
    transform = build_transforms(model, is_training=False)
    num_classes = model.num_classes if check_labels else None
    if args.max_images and getattr(args, 'sample', 'first') == 'uniform':
        # a uniform sample of the whole split (threshold): the first N images of an image folder sorted by class
        # would be N images of a few classes
        import torch.utils.data as tud

        from .data import ImageStream, collate_skipping_bad, load_stream, uniform_sample
        rows = uniform_sample(load_stream(spec, split), args.max_images, seed=getattr(args, 'seed', 0))
        stream = ImageStream(rows, transform, spec.image_column, spec.label_column, num_classes=num_classes,
                             split=split, source=spec.dataset, ordered=False)
        loader = tud.DataLoader(stream,
                                batch_size=args.batch_size, collate_fn=collate_skipping_bad)
    else:
        loader = make_loader(spec, split, transform, args.batch_size, limit=args.max_images or None,
                             workers=args.workers, num_classes=num_classes, check_labels=check_labels)
    return model, loader, spec, split
