"""Hub-ready folders: ``config.json`` (timm's ``save_for_hf`` with explicit model_args) + ``model.safetensors``
(+ ``README.md`` model card), written to a temp dir and renamed, so a folder is never half-written."""
import json
import os
import shutil
from typing import Any, Dict, Optional

from . import __version__


def export_folder(model, folder: str, model_args: Dict[str, Any], eval_summary: Optional[Dict] = None,
                  train_config: Optional[Dict] = None, card: bool = True, repo_id: Optional[str] = None,
                  dataset: Optional[str] = None, card_extra: str = '') -> str:
    from timm.models import save_for_hf
    tmp = folder.rstrip('/') + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model_config = {'skipnet_version': __version__}
    if 'base_model' in model_args:  # skipnet_from_timm: the folder's weights are complete, never fetch the base
        model_args = dict(model_args, base_pretrained=False)
    save_for_hf(model, tmp, model_config=model_config, model_args=dict(model_args), safe_serialization=True)
    if eval_summary is not None:
        with open(os.path.join(tmp, 'eval_results.json'), 'w') as f:
            json.dump(eval_summary, f, indent=2)
    if card:
        from .card import write_model_card
        write_model_card(tmp, eval_summary=eval_summary, train_config=train_config,
                         repo_id=repo_id or os.path.basename(os.path.abspath(folder)), dataset=dataset,
                         extra=card_extra)
    if os.path.exists(folder):
        old = folder.rstrip('/') + '.old'
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder
