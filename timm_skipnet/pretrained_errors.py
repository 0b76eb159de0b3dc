"""A clear error when ``pretrained=True`` cannot reach the Hugging Face Hub (offline, no network, repository not
published): it names the Hub repository and, for weights that ship with the source tree (``hub_configs/``), how to
load them offline with ``local-dir:``.

    with explain_missing_pretrained(variant, kwargs.get('pretrained_cfg')):
        return build_model_with_cfg(SkipNetResNet, variant, pretrained, ...)
"""
import contextlib
import pathlib
from typing import Any, Iterator, Optional, Tuple, Type

# source checkout: <repo>/timm_skipnet/pretrained_errors.py -> <repo>/hub_configs/<arch>.<tag>/
SHIPPED_DIR = pathlib.Path(__file__).resolve().parents[1] / 'hub_configs'


def _hub_errors() -> Tuple[Type[BaseException], ...]:
    """huggingface_hub's errors for 'weights not reachable' (offline, no network, no such repo / file / revision),
    plus the builtin network errors; resolved lazily so that importing this module stays light."""
    errors: Tuple[Type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # huggingface_hub is a dependency; without it timm itself cannot download
        return errors
    names = ('EntryNotFoundError', 'LocalEntryNotFoundError', 'RepositoryNotFoundError', 'RevisionNotFoundError',
             'GatedRepoError', 'OfflineModeIsEnabled', 'HfHubHTTPError')
    return errors + tuple(getattr(hf_errors, n) for n in names if hasattr(hf_errors, n))


def shipped_folder(model_name: str) -> Optional[pathlib.Path]:
    """The folder under ``hub_configs/`` that holds ``model_name``'s weights in a source checkout, or None."""
    folder = SHIPPED_DIR / model_name
    return folder if (folder / 'model.safetensors').is_file() else None


def missing_pretrained_message(model_name: str, hf_hub_id: Optional[str]) -> str:
    """What to tell a user whose ``pretrained=True`` for ``model_name`` (``arch.tag``) could not load the weights of
    Hub repository ``hf_hub_id``."""
    repo = f'the Hugging Face Hub repository {hf_hub_id}' if hf_hub_id else 'the Hugging Face Hub'
    lines = [f'{model_name}: pretrained=True downloads its weights from {repo}, which could not be reached or does '
             'not hold them (offline, HF_HUB_OFFLINE=1, no network, or the repository is not published yet).']
    folder = shipped_folder(model_name)
    if folder is not None:
        lines.append(f'The same weights ship with the source tree in {folder}; load them offline with '
                     f"timm.create_model('local-dir:{folder}', pretrained=True).")
    else:
        lines.append('Download them once where the Hub is reachable (they are then cached), or load a local copy '
                     "of the repository's files with timm.create_model('local-dir:/path/to/folder', pretrained=True).")
    return ' '.join(lines)


def _resolve(variant: str, pretrained_cfg: Any) -> Tuple[str, Optional[str]]:
    """(``arch.tag`` name, Hub repository) of what timm resolved for ``variant``; never raises."""
    variant, _, tag = variant.partition('.')  # 'resnet50.tv_in1k' names its tag
    pretrained_cfg = pretrained_cfg or tag or None
    try:
        from timm.models import resolve_pretrained_cfg
        if hasattr(pretrained_cfg, 'to_dict'):
            pretrained_cfg = pretrained_cfg.to_dict()
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg)
        return (f'{variant}.{cfg.tag}' if cfg.tag else variant), cfg.hf_hub_id
    except Exception:  # the message must not fail on an unknown name or tag
        return variant, None


@contextlib.contextmanager
def explain_missing_pretrained(variant: str, pretrained_cfg: Any = None) -> Iterator[None]:
    """Turn huggingface_hub's offline / not-found errors raised inside the block into a RuntimeError with
    :func:`missing_pretrained_message` (the original error chained as its cause).

    Args:
        variant: the architecture name the entrypoint builds (``skipnet_resnet38_cifar``), or a timm name with its
            tag (``resnet50.tv_in1k``, as ``skipnet_from_timm`` passes its ``base_model``).
        pretrained_cfg: what timm passed to the entrypoint as ``pretrained_cfg`` (a tag such as ``'cifar10'``, a
            dict, a PretrainedCfg or None for the default tag); names the resolved Hub repository.
    """
    try:
        yield
    except _hub_errors() as e:
        raise RuntimeError(missing_pretrained_message(*_resolve(variant, pretrained_cfg))) from e
