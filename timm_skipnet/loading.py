"""Build a SkipNet from any name users have for one, and load weights safely (never unpickling)."""
import os

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
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path, device='cpu')
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f'{path} holds a {type(state).__name__}, expected a state dict of tensors.')
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=strict)


def load_model(name: str, checkpoint: str = '', num_classes: int | None = None, pretrained: bool = False):
    """A SkipNet from a ``skipnet_*`` name, ``local-dir:`` / ``hf-hub:`` (with their own weights) or a plain timm
    ResNet name (converted); ``checkpoint`` (weights file or exported folder) is loaded on top."""
    import timm

    import timm_skipnet  # noqa: F401 -- registers the models

    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
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


def model_and_eval_loader(args):
    """The shared start of ``timm-skipnet eval`` / ``analyze``: the model on its device in eval mode and a loader of
    the evaluation split; returns ``(model, loader, spec, split)``."""
    from .data import DataSpec, build_transforms, make_loader
    spec = DataSpec(args.dataset, image_column=args.image_column, label_column=args.label_column).resolved()
    split = args.split or spec.eval_split
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = load_model(args.model, args.checkpoint, args.num_classes or spec.num_classes, args.pretrained)
    model = model.to(device).eval()
    transform = build_transforms(model, is_training=False)
    if args.max_images and getattr(args, 'sample', 'first') == 'uniform':
        # a uniform sample of the whole split (threshold): the first N images of an image folder sorted by class
        # would be N images of a few classes
        import torch.utils.data as tud

        from .data import ImageStream, collate_skipping_bad, load_stream, uniform_sample
        rows = uniform_sample(load_stream(spec, split), args.max_images, seed=getattr(args, 'seed', 0))
        loader = tud.DataLoader(ImageStream(rows, transform, spec.image_column, spec.label_column),
                                batch_size=args.batch_size, collate_fn=collate_skipping_bad)
    else:
        loader = make_loader(spec, split, transform, args.batch_size, limit=args.max_images or None,
                             workers=args.workers)
    return model, loader, spec, split
