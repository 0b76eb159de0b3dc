"""Wall-clock benchmark: plain timm ResNet vs SkipNet dense vs SkipNet sparse at a chosen execution rate.

The gates get random output weights and a bias calibrated so that about ``rate`` of the gated blocks run; which
blocks run then differs from image to image (no two images need share a path: the hard case for batching) but is
deterministic, so the timed calls are the real inference path (greedy gates, no trace). Gate compute is included
in every SkipNet timing. Variants are timed interleaved (round robin) and the median is reported, so
background load drifts hit all of them alike.

R   = MACs(plain ResNet) / mean MACs(SkipNet, measured decisions)  -- the ideal speedup
S   = latency(plain) / latency(SkipNet)                            -- the measured speedup
eta = S / R                                                          -- the share of the ideal that is realised

The row "blocks only, decisions given" runs the same images' blocks with no gate computed (the decisions handed
in): its S is the most skipping can give on this hardware, where a MAC does not cost the same time in every block
(R assumes it does), and sparse S over it is the share the gates and their control flow leave.
"""
import copy
import functools
import os
import random
import statistics
import time
from typing import Dict, List, Sequence

import timm
import torch
from timm.models.resnet import ResNet

from .accounting import measure_mac_table
from .skipnet import _run_sparse, _shortcut, convert_to_skipnet


def _base_name(model_name: str) -> str:
    return model_name[len('skipnet_'):] if model_name.startswith('skipnet_') else model_name


def _build(model_name: str):
    """The plain timm ResNet and a SkipNet with identical backbone weights."""
    if model_name.startswith('skipnet_') and model_name.endswith('_cifar'):
        skip = timm.create_model(model_name).eval()
        plain = copy.deepcopy(skip)
        plain.set_gate_policy('open')  # a CIFAR ResNet has no timm twin: all-open without gates is the same net
    else:
        plain = timm.create_model(_base_name(model_name)).eval()
        skip = convert_to_skipnet(copy.deepcopy(plain))
    return plain, skip.eval()


def _timer(device: torch.device):
    """perf_counter that first waits for the device's queued kernels: on a GPU a call returns before it is done."""
    if device.type == 'cuda':
        def now():
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


@torch.inference_mode()
def run_bench(model_name: str = 'skipnet_resnet50', batch_sizes: Sequence[int] = (1, 8, 64), rate: float = 0.5,
              img_size: int = 224, min_time: float = 3.0, min_iters: int = 3, seed: int = 0,
              device: str = 'cpu', compile: bool = False, overflow: str = 'exact',
              compile_mode: str = 'default', graph: bool = False) -> List[Dict]:
    """``compile``: every variant under ``torch.compile(fullgraph=True)`` (the SkipNet in static execution, its
    capacity calibrated on images other than the timed ones), compared with the compiled plain ResNet. ``graph``:
    every variant recorded as one CUDA graph (:class:`~timm_skipnet.cuda_graphs.CUDAGraphed`), likewise."""
    torch.manual_seed(seed)
    device = torch.device(device)
    plain, skip = _build(model_name)
    table = measure_mac_table(skip, (3, img_size, img_size))
    plain, skip = plain.to(device), skip.to(device)
    now = _timer(device)
    # the gate bias is set once per variant switch, on these images
    calib = torch.randn(16, 3, img_size, img_size).to(device)
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 3, img_size, img_size).to(device)
        macs_seen: List[torch.Tensor] = []
        if graph:
            variants = _graphed_variants(plain, skip, x, rate, table, macs_seen, calib, overflow)
        elif compile:
            variants = _compiled_variants(plain, skip, x, rate, table, macs_seen, calib, overflow, compile_mode)
        else:
            variants = _variants(plain, skip, x, rate, table, macs_seen, calib)
        times = {k: [] for k in variants}
        plain_name = next(iter(variants))
        for fn in variants.values():  # warm-up (compiles)
            fn()
        start = now()
        order = list(variants.items())
        shuffle = random.Random(seed).shuffle
        while now() - start < min_time * len(variants) or len(times[plain_name]) < min_iters:
            shuffle(order)  # a new order each round: no variant always runs after the same one (caches, clocks)
            for name, fn in order:
                t0 = now()
                fn()
                times[name].append(now() - t0)
        dyn = torch.cat(macs_seen).mean().item()
        t_plain = statistics.median(times[plain_name])
        for name, ts in times.items():
            t = statistics.median(ts)
            full_row = name.startswith('plain') or 'open' in name
            r = 1.0 if name.startswith('plain') else table.full_macs / (
                (table.full_macs + sum(table.gates)) if full_row else dyn)
            s = t_plain / t
            row = dict(batch=bs, variant=name, latency_ms=1e3 * t, img_per_s=bs / t, ideal_R=r, speedup_S=s,
                       eta=s / r, iters=len(ts))
            if 'open' in name:  # every gate computed, every block run: what the gates alone cost
                row['gate_us'] = 1e6 * (t - t_plain) / skip.num_gated_blocks
            rows.append(row)
    return rows


def _final_layers(gates) -> List[torch.nn.Linear]:
    return [gates.head] if hasattr(gates, 'head') else [g.fc for g in gates.gates]


@torch.no_grad()
def calibrate_gates(skip, x: torch.Tensor, rate: float, seed: int = 0) -> float:
    """Give the gates random output weights and the bias that makes about ``rate`` of the gated blocks run on ``x``:
    decisions then differ per image but are deterministic, so timing runs the greedy inference path untraced."""
    g = torch.Generator().manual_seed(seed)
    layers = _final_layers(skip.gates)
    for layer in layers:  # drawn on the CPU: the same gates on every device
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    lo, hi = -30.0, 30.0
    for _ in range(14):
        mid = (lo + hi) / 2
        for layer in layers:
            layer.bias.fill_(mid)
        executed = skip.forward_with_gates(x).actions.mean().item()
        lo, hi = (lo, mid) if executed > rate else (mid, hi)
    return executed


def _variants(plain, skip, x, rate, table, macs_seen, calib) -> Dict:
    """The timed callables for one input batch. SkipNet rows run the inference path (greedy gates, no trace);
    the MACs their decisions cost are taken from one traced, untimed call on the same batch. Each variant has its own
    copy of the model: switching gate weights between timed calls would refold the gates inside the timing and count
    the refold as gate cost."""
    opened = copy.deepcopy(skip)
    opened.gates.set_constant_probability(1.0)
    dense = copy.deepcopy(skip)
    calibrate_gates(dense, calib, rate)
    sparse = copy.deepcopy(dense)
    dense.set_execution('dense')
    sparse.set_execution('sparse')
    opened.set_execution('sparse')
    for m in (opened, dense, sparse):  # built under inference_mode, whose in-place edits count no versions
        m.eval()
    actions = sparse.forward_with_gates(x).actions.bool()
    macs_seen.append(table.per_image_macs(actions))
    runs = [bool(a) for a in actions[0]] if x.shape[0] == 1 else list(actions.t().contiguous())
    return {  # partials: the model each row times is its ``.func``
        'plain timm ResNet': functools.partial(plain, x),
        'SkipNet, all gates open': functools.partial(opened, x),
        f'SkipNet dense, rate {rate:g}': functools.partial(dense, x),
        f'SkipNet sparse, rate {rate:g}': functools.partial(sparse, x),
        'blocks only, decisions given': functools.partial(_run_given_path, sparse, x, runs),
    }


@torch.no_grad()
def _run_given_path(skip, x: torch.Tensor, runs: List) -> torch.Tensor:
    """The SkipNet's forward with each gated block's decisions given (``runs[k]``: a (B,) bool tensor, or a Python
    bool at batch 1) and no gate computed."""
    blocks = skip.blocks()
    x = blocks[0](skip.maxpool(skip._forward_stem(x)))
    for block, run in zip(blocks[1:], runs, strict=True):
        if x.shape[0] == 1:
            x = block(x) if run else _shortcut(block, x)
        else:
            x = _run_sparse(block, x, run, reuse_input=True)
    return skip.forward_head(x)


def _compiled_variants(plain, skip, x, rate, table, macs_seen, calib, overflow='exact',
                       compile_mode='default') -> Dict:
    """Compiled twins of :func:`_variants`: plain, all gates open, and the calibrated gates in static execution
    (fixed-size sub-batches, torch.cond at batch 1). Separate copies, so no variant recompiles another."""
    from .capacity import calibrate_capacity
    torch._dynamo.reset()
    opened = copy.deepcopy(skip)
    opened.gates.set_constant_probability(1.0)
    gated = copy.deepcopy(skip)
    calibrate_gates(gated, calib, rate)
    calibrate_capacity(gated, [calib])
    gated.set_gate_capacity(gated.gate_capacity.tolist(), overflow=overflow)
    macs_seen.append(table.per_image_macs(gated.forward_with_gates(x).actions))
    compiled = {name: torch.compile(m, fullgraph=True, dynamic=False, mode=compile_mode) for name, m in
                (('plain', plain), ('open', opened), ('gated', gated))}
    return {
        'plain timm ResNet (compiled)': lambda: compiled['plain'](x),
        'SkipNet, all gates open (compiled)': lambda: compiled['open'](x),
        f'SkipNet static, rate {rate:g} (compiled)': lambda: compiled['gated'](x),
    }


def _graphed_variants(plain, skip, x, rate, table, macs_seen, calib, overflow='exact') -> Dict:
    """CUDA-graph twins of :func:`_compiled_variants`: each variant recorded once for this batch, then replayed."""
    from .capacity import calibrate_capacity
    from .cuda_graphs import CUDAGraphed
    opened = copy.deepcopy(skip)
    opened.gates.set_constant_probability(1.0)
    gated = copy.deepcopy(skip)
    calibrate_gates(gated, calib, rate)
    calibrate_capacity(gated, [calib])
    gated.set_gate_capacity(gated.gate_capacity.tolist(), overflow=overflow)
    macs_seen.append(table.per_image_macs(gated.forward_with_gates(x).actions))
    graphs = {name: CUDAGraphed(m, x) for name, m in (('plain', plain), ('open', opened), ('gated', gated))}
    return {
        'plain timm ResNet (CUDA graph)': lambda: graphs['plain'](x),
        'SkipNet, all gates open (CUDA graph)': lambda: graphs['open'](x),
        f'SkipNet static, rate {rate:g} (CUDA graph)': lambda: graphs['gated'](x),
    }


def format_table(rows: List[Dict]) -> str:
    head = '| batch | variant | latency (ms) | images/s | ideal R | measured S | eta = S/R |'
    lines = [head, '|---:|---|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['batch']} | {r['variant']} | {r['latency_ms']:.1f} | {r['img_per_s']:.1f} | "
                     f"{r['ideal_R']:.3f} | {r['speedup_S']:.3f} | {r['eta']:.3f} |")
    given = {r['batch']: r['speedup_S'] for r in rows if r['variant'] == 'blocks only, decisions given'}
    kept = [f"batch {r['batch']}: {r['speedup_S'] / given[r['batch']]:.3f}" for r in rows
            if r['variant'].startswith('SkipNet sparse') and r['batch'] in given]
    if kept:
        lines.append('')
        lines.append('Share of the blocks-only speed-up that the gated model keeps (sparse S / blocks-only S): '
                     + '; '.join(kept))
    gate = [f"batch {r['batch']}: {r['gate_us']:.0f} us" for r in rows if 'gate_us' in r]
    if gate:
        lines.append('')
        lines.append('Gate cost per gate (all gates computed and open, minus plain, over the gated blocks): '
                     + '; '.join(gate))
    return '\n'.join(lines)


def device_name(device: str) -> str:
    """What the table header says ran the numbers."""
    d = torch.device(device)
    if d.type == 'cuda':
        return torch.cuda.get_device_name(d)
    return f'CPU, {torch.get_num_threads()} threads'


def run_images_bench(model_id: str, data: str, batch_sizes: Sequence[int] = (1, 8, 64, 256),
                     compile: bool = False, images: int = 2048, device: str = 'cpu', rounds: int = 3,
                     overflow: str = 'exact', compile_mode: str = 'default', graph: bool = False,
                     checkpoint: str = '', aoti: bool = False) -> List[Dict]:
    """A trained SkipNet on real images (its own per-image decisions) against the same weights with every gate
    open (no gate computed: the plain ResNet), both eager, both compiled, both CUDA graphs or both AOTInductor
    packages (``aoti``: built per batch size, :mod:`timm_skipnet.aoti_export`). Batch 1 times the first 200 images.
    ``checkpoint``: weights loaded on top (e.g. hardened thresholds)."""
    from .accounting import measure_mac_table as _table
    from .data import DataSpec, build_transforms, make_loader
    from .loading import load_model
    model = load_model(model_id, checkpoint, pretrained=True).eval()
    model.set_gate_capacity(model.gate_capacity.tolist(), overflow=overflow)
    baseline = copy.deepcopy(model)
    baseline.set_gate_policy('open')
    loader = make_loader(DataSpec(data), 'test', build_transforms(model, False), 256, limit=images)
    xs = torch.cat([x for x, _, _ in loader if x is not None])
    with torch.inference_mode():
        actions = torch.cat([model.forward_with_gates(xs[i:i + 256]).actions for i in range(0, len(xs), 256)])
    ideal = _table(model).full_macs / _table(model).per_image_macs(actions).mean().item()
    model, baseline = model.to(device), baseline.to(device)
    rows = []
    for bs in batch_sizes:
        # whole batches only: a compiled graph has one batch size
        n = min(200, len(xs)) if bs == 1 else (len(xs) // bs) * bs
        if n == 0:
            raise ValueError(f'batch size {bs} is larger than the {len(xs)} images timed; lower it or raise --images.')
        timed = (model, baseline)
        if aoti:
            timed = _aoti_packages(timed, bs)
        elif graph:
            from .cuda_graphs import CUDAGraphed
            timed = tuple(CUDAGraphed(m, xs[:bs].to(device)) for m in timed)
        elif compile:
            torch._dynamo.reset()
            timed = tuple(torch.compile(m, fullgraph=True, dynamic=False, mode=compile_mode) for m in timed)
        r = speedup_on_images(timed[0], timed[1], xs[:n], ((bs, n),), rounds=rounds, device=device)[bs]
        mode = 'AOTInductor' if aoti else 'CUDA graph' if graph else 'compiled' if compile else 'eager'
        rows.append(dict(batch=bs, mode=mode, images=n, ideal_R=ideal,
                         skipnet_img_per_s=r['model_img_per_s'], plain_img_per_s=r['baseline_img_per_s'],
                         speedup_S=r['speedup'], eta=r['speedup'] / ideal))
    return rows


def _aoti_packages(models, batch_size: int) -> tuple:
    """Each model built into an AOTInductor package for ``batch_size`` and loaded (the files live in a temporary
    folder only while they load: a loaded package keeps its own copy of the compiled library)."""
    import tempfile

    from .aoti_export import export_aoti, load_aoti
    with tempfile.TemporaryDirectory() as tmp:
        return tuple(load_aoti(export_aoti(m, os.path.join(tmp, f'model{i}.pt2'), batch_size=batch_size))
                     for i, m in enumerate(models))


def format_images_table(rows: List[Dict]) -> str:
    lines = ['| batch | mode | images | ResNet img/s | SkipNet img/s | measured S | ideal R | eta = S/R |',
             '|---:|---|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['batch']} | {r['mode']} | {r['images']} | {r['plain_img_per_s']:.0f} | "
                     f"{r['skipnet_img_per_s']:.0f} | {r['speedup_S']:.2f}x | {r['ideal_R']:.2f}x | {r['eta']:.2f} |")
    return '\n'.join(lines)


def main(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f'--device {args.device}: no CUDA device is visible to torch {torch.__version__}; '
                         'use --device cpu or run on a GPU machine.')
    where = device_name(args.device)
    if args.train:
        if args.mode not in ('eager', 'compiled'):
            raise SystemExit(f'--train times eager or compiled steps: --mode eager or compiled, not {args.mode}.')
        rows = run_train_bench(args.model, args.batch_sizes[0], steps=args.steps, device=args.device,
                               compile=args.mode == 'compiled')
        print(f"# training step, {args.model}, batch {args.batch_sizes[0]}, {where}"
              f"{', every forward compiled' if args.mode == 'compiled' else ''}")
        print('| variant | step (ms) | images/s | cost vs plain |\n|---|---:|---:|---:|')
        for r in rows:
            print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['img_per_s']:.1f} | {r['cost_vs_plain']:.3f}x |")
        return
    if args.mode == 'graph' and not args.device.startswith('cuda'):
        raise SystemExit('--mode graph records CUDA graphs: add --device cuda (on a GPU machine).')
    modes = {'eager': ['eager'], 'compiled': ['compiled'], 'both': ['eager', 'compiled'], 'graph': ['graph'],
             'aoti': ['aoti']}[args.mode]
    if args.mode == 'aoti' and not args.data:
        raise SystemExit('--mode aoti times a trained model on real images: add --data <dataset> (and a trained '
                         '--model, e.g. local-dir:hub_configs/skipnet_resnet38_cifar.cifar10).')
    if args.data:
        rows = [r for m in modes for r in run_images_bench(
            args.model, args.data, args.batch_sizes, compile=m == 'compiled', images=args.images, device=args.device,
            overflow=args.overflow, compile_mode=args.compile_mode, graph=m == 'graph', checkpoint=args.checkpoint,
            aoti=m == 'aoti')]
        weights = f' + {args.checkpoint}' if args.checkpoint else ''
        print(f'# {args.model}{weights} vs the same weights with every gate open, on {args.data} test images, {where}, '
              f'torch {torch.__version__}')
        print(format_images_table(rows))
    else:
        rows = [r for m in modes for r in run_bench(
            args.model, args.batch_sizes, args.rate, args.img_size, args.min_time, seed=args.seed,
            device=args.device, compile=m == 'compiled', overflow=args.overflow, compile_mode=args.compile_mode,
            graph=m == 'graph')]
        print(f'# {args.model} at {args.img_size} px, {where}, torch {torch.__version__}')
        print(format_table(rows))
    if args.output:
        import json

        from .checkpoints import atomic_write_text
        atomic_write_text(args.output, json.dumps(rows, indent=2))


def add_parser(sub) -> None:
    p = sub.add_parser('bench', help='latency / throughput of real skipping vs the plain ResNet (prints a table)')
    p.add_argument('--model', default='skipnet_resnet50', help='skipnet_* name or a timm ResNet name')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8, 64])
    p.add_argument('--rate', type=float, default=0.5, help='execution rate of every gated block (random per image)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--min-time', type=float, default=3.0, help='seconds of timing per variant and batch size')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N (GPU timings wait for the kernels)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output', default='', help='also write the rows as JSON')
    p.add_argument('--mode', default='eager', choices=('eager', 'compiled', 'both', 'graph', 'aoti'),
                   help='eager, or every variant under torch.compile(fullgraph=True), or both (like with like); '
                        'graph: every variant recorded as one CUDA graph (--device cuda); aoti: every variant '
                        'built into an AOTInductor package (with --data)')
    p.add_argument('--data', default='', help='time a trained --model (local-dir:, hf-hub:) on this dataset\'s test '
                   'images instead of synthetic gates, e.g. ../shared/data/cifar10/plain')
    p.add_argument('--overflow', default='exact', choices=('exact', 'shortcut'),
                   help="compiled SkipNet: a batch beyond a gate's capacity falls back exactly (exact) or sends the "
                        'excess down the shortcut without a host read (shortcut; counted in gate_overflow)')
    p.add_argument('--compile-mode', default='default', help="torch.compile mode, e.g. 'reduce-overhead' (CUDA "
                   'graphs) or max-autotune-no-cudagraphs')
    p.add_argument('--images', type=int, default=2048, help='--data: test images timed (batch 1: the first 200)')
    p.add_argument('--checkpoint', default='', help='--data: weights file loaded on top of --model (e.g. the output '
                   'of threshold --harden)')
    p.add_argument('--train', action='store_true', help='time training steps per stage instead (first batch size; '
                   '--mode compiled compiles every forward)')
    p.add_argument('--steps', type=int, default=20, help='--train: timed steps per variant')
    p.set_defaults(func=main)



def _plain_forward(model, x: torch.Tensor) -> torch.Tensor:
    """stem -> every residual block -> timm's ResNet head: the network without any SkipNet code path."""
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    for block in model.blocks():
        x = block(x)
    return ResNet.forward_head(model, x)


def run_train_bench(model_name: str = 'skipnet_resnet38_cifar', batch_size: int = 128, steps: int = 20,
                    img_size: int = 0, device: str = 'cpu', compile: bool = False) -> List[Dict]:
    """Images/s of one optimizer step per stage, against a plain timm-style step of the same backbone.

    ``plain`` is the same weights run as a plain chain (stem, every block in order, timm's head), with no gate
    module and none of this package's trunk code, trained as timm's train.py would (cross-entropy, SGD);
    ``base`` / ``sp`` / ``rl`` are this package's stages (dense execution, as in training). ``compile``: every
    forward under ``torch.compile`` (as ``--compile`` trains), the plain step's too.
    """
    torch.manual_seed(0)
    device = torch.device(device)
    now = _timer(device)
    skip = timm.create_model(model_name).to(device)
    size = img_size or skip.pretrained_cfg['input_size'][-1]
    x = torch.randn(batch_size, 3, size, size).to(device)
    y = torch.randint(0, skip.num_classes, (batch_size,)).to(device)
    plain = copy.deepcopy(skip)
    del plain.gates  # a plain ResNet
    plain_forward = torch.compile(_plain_forward) if compile else _plain_forward
    skip_forward = torch.compile(skip) if compile else skip

    def step_fn(model, loss_fn):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def fn():
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            opt.step()
        return fn

    ce = torch.nn.functional.cross_entropy
    variants = {
        'plain ResNet (timm-style step)': step_fn(plain, lambda m: ce(plain_forward(m, x), y)),
        'base (gates open)': step_fn(skip, lambda m: ce(skip_forward(x, gate_policy='open'), y)),
        'sp (straight-through)': step_fn(skip, lambda m: ce(skip_forward(x, gate_policy='straight_through'), y)),
        'rl (sampled + REINFORCE)': step_fn(skip, lambda m: _rl_loss(skip_forward, x, y)),
    }
    skip.train()
    plain.train()
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    order = list(variants.items())
    for step in range(steps):
        random.Random(step).shuffle(order)  # a new order each round, as in run_bench
        for name, fn in order:
            t0 = now()
            fn()
            times[name].append(now() - t0)
    t_plain = statistics.median(times['plain ResNet (timm-style step)'])
    return [dict(variant=k, step_ms=1e3 * statistics.median(v), img_per_s=batch_size / statistics.median(v),
                 cost_vs_plain=statistics.median(v) / t_plain) for k, v in times.items()]


def _rl_loss(model, x, y):
    from .rewards import hybrid_rl_loss
    t = model(x, gate_policy='sample', return_trace=True)
    return hybrid_rl_loss(t.logits, y, t.actions, t.log_probs, alpha=0.1)[0]


@torch.inference_mode()
def images_per_second(model, xs: torch.Tensor, batch_size: int, device: str = 'cpu') -> float:
    """Throughput of ``model`` on the images ``xs`` (already preprocessed) in batches of ``batch_size``, one warm-up
    batch excluded; the images are moved to ``device`` before the clock starts, as a loader with pinned memory
    would have them."""
    now = _timer(torch.device(device))
    xs = xs.to(device)
    model(xs[:batch_size])
    t0 = now()
    for i in range(0, len(xs), batch_size):
        model(xs[i:i + batch_size])
    return len(xs) / (now() - t0)


def speedup_on_images(model, baseline, xs: torch.Tensor, settings: Sequence = ((1, 1000), (256, 10_000)),
                      rounds: int = 3, device: str = 'cpu') -> Dict[int, Dict[str, float]]:
    """Images/s of ``model`` (real skipping on its own decisions) and ``baseline`` per (batch size, images): the
    median of ``rounds`` interleaved rounds, so background load drifts hit both alike."""
    out = {}
    for bs, n in settings:
        runs = []
        for r in range(rounds):  # alternate which runs first: neither always inherits the other's caches and clocks
            pair = (model, baseline) if r % 2 == 0 else (baseline, model)
            ips = {id(m): images_per_second(m, xs[:n], bs, device) for m in pair}
            runs.append((ips[id(model)], ips[id(baseline)]))
        model_ips, base_ips = (statistics.median(r[i] for r in runs) for i in (0, 1))
        out[bs] = dict(images=min(n, len(xs)), model_img_per_s=model_ips, baseline_img_per_s=base_ips,
                       speedup=model_ips / base_ips)
    return out
