"""Training checkpoints (Accelerate state + trainer state) and atomic file writes: nothing is ever half-written."""
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, Optional

import torch

EMA_FILE = 'model_ema.safetensors'  # the trainer's weight average (--model-ema), beside a checkpoint's model weights
EMA_BN_FILE = 'model_ema_bn.safetensors'  # the same average with its BatchNorm statistics recomputed (delivered)
RNG_FILE = 'rng_state_{}.safetensors'  # each process's random state, in a format that cannot run code when read


def save_rng_state(folder: str, rank: int) -> str:
    """Python, NumPy, torch (and CUDA) random states of this process as safetensors + JSON metadata.

    Accelerate pickles the same states (``random_states_<rank>.pkl``), and when that file is missing or refused
    by the weights-only loader it only logs so at INFO and resumes from a fresh state: the run no longer
    reproduces an uninterrupted one. This file is the trainer's own copy, read back by :func:`restore_rng_state`."""
    import random

    import numpy as np
    from safetensors.torch import save_file
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {'python': torch.tensor(py_state, dtype=torch.int64),
               'numpy': torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f'cuda_{i}': s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = dict(python=json.dumps([py_version, py_gauss]), numpy=json.dumps([np_name, int(np_pos), int(np_has_gauss),
                                                                             float(np_gauss)]))
    path = os.path.join(folder, RNG_FILE.format(rank))
    save_file(tensors, path + '.tmp', metadata=meta)
    os.replace(path + '.tmp', path)
    return path


def restore_rng_state(folder: str, rank: int) -> bool:
    """Set this process's random states from :func:`save_rng_state`'s file; False when the checkpoint has none."""
    import random

    import numpy as np
    from safetensors import safe_open
    path = os.path.join(folder, RNG_FILE.format(rank))
    if not os.path.exists(path):
        return False
    with safe_open(path, framework='pt') as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    py_version, py_gauss = json.loads(meta['python'])
    random.setstate((py_version, tuple(tensors['python'].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta['numpy'])
    np.random.set_state((np_name, tensors['numpy'].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors['torch'])
    cuda = [tensors[f'cuda_{i}'] for i in range(len(tensors)) if f'cuda_{i}' in tensors]
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    return True


def accelerate_rng_problem(folder: str, rank: int) -> Optional[str]:
    """Why Accelerate could not have restored ``random_states_<rank>.pkl`` (missing, or refused by its weights-only
    loader), or None when it could."""
    from accelerate.utils import load
    name = f'random_states_{rank}.pkl'
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return f'{name} is missing'
    try:
        states = load(path, map_location='cpu')
    except Exception as e:  # noqa: BLE001 -- reported; never retried unsafely
        found = re.search(r'GLOBAL (\S+)', str(e))
        return f'{name} was refused by the weights-only loader' + (f' ({found.group(1)})' if found else
                                                                    f' ({type(e).__name__})')
    if not isinstance(states, dict) or 'torch_manual_seed' not in states:
        return f'{name} holds no torch random state'
    return None


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
    save_rng_state(tmp, accelerator.process_index)
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
