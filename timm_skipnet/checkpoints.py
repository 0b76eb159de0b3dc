"""Training checkpoints (Accelerate state + trainer state) and atomic file writes: nothing is ever half-written."""
import json
import os
import shutil
from typing import Any, Callable, Dict, Optional

EMA_FILE = 'model_ema.safetensors'  # the trainer's weight average (--model-ema), beside a checkpoint's model weights


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temp file, then rename: readers see the old or the new file, never half of one."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, output: str, state: Dict[str, Any], keep: int = 2,
                    write_extra: Optional[Callable[[str], None]] = None) -> str:
    """``save_state`` into a temp dir, then rename: an interrupted save never touches the previous checkpoint.
    ``write_extra(dir)`` (main process) adds files of the trainer's own, e.g. the EMA weights, before the rename."""
    root = os.path.join(output, 'checkpoints')
    final = os.path.join(root, f"step_{state['global_step']:07d}")
    tmp = final + '.tmp'
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every rank's RNG file is in tmp before it is renamed
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        with open(os.path.join(tmp, 'trainer_state.json'), 'w') as f:
            json.dump(state, f, indent=2)
        if os.path.exists(final):  # re-saving a step: keep the old copy until the new one is in place
            os.replace(final, final + '.old')
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, 'latest'), os.path.basename(final))
        shutil.rmtree(final + '.old', ignore_errors=True)
        older = sorted(d for d in os.listdir(root) if d.startswith('step_') and d[5:].isdigit()
                       and int(d[5:]) < state['global_step'])
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir from itself, its ``checkpoints/`` parent or the run's output dir (via ``latest``)."""
    for root in (path, os.path.join(path, 'checkpoints')):
        if os.path.exists(os.path.join(root, 'trainer_state.json')):
            return root
        latest = os.path.join(root, 'latest')
        if os.path.exists(latest):
            with open(latest) as f:
                return os.path.join(root, f.read().strip())
    raise FileNotFoundError(f'No checkpoint to resume in {path} (expected trainer_state.json or checkpoints/latest).')
