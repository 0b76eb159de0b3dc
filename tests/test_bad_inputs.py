"""Bad inputs, one matrix: data, model files, command-line flags, tensors, checkpoints. Each must fail loudly with
an error that names what was wrong (file, split, column, row, value, flag) and what to do, or be computed right."""
import json
import os
import shutil
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from tests.helpers import randomize_gates
from timm_skipnet import cli
from timm_skipnet.train import TrainConfig, train

UNSAFE_ADVICE = ('weights_only=False', '`weights_only` set to `False`', 'add_safe_globals', 'safe_globals(')


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _cfg(dataset, out, **kw) -> TrainConfig:
    base = dict(dataset=str(dataset), batch_size=8, train_num_samples=64, eval_num_samples=16, lr=0.05,
                log_every=1, output=str(out), shuffle_buffer=64, checkpoint_every=1000, export=False)
    return TrainConfig(**{**base, **kw})


def _parquet_with_labels(cifar10_dir, folder, split, changes, rows=40):
    """``rows`` CIFAR images as ``<folder>/<split>-00000-of-00001.parquet``, labels ``changes`` ({row: value})
    replaced; the file keeps the Hub's metadata (10 classes)."""
    source = 'test-00000-of-00001.parquet' if split == 'test' else 'train-00000-of-00002.parquet'
    src = pq.read_table(os.path.join(cifar10_dir, source)).slice(0, rows)
    labels = src.column('label').to_pylist()
    for row, value in changes.items():
        labels[row] = value
    field = src.schema.field('label')
    table = src.set_column(src.schema.get_field_index('label'), field, pa.array(labels, type=field.type))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{split}-00000-of-00001.parquet')
    pq.write_table(table, path)
    return path


# ---- data -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('value', [12, -1, 10])
def test_eval_refuses_an_out_of_range_label_naming_split_column_row_and_value(cifar10_dir, tmp_path, value):
    path = _parquet_with_labels(cifar10_dir, tmp_path / 'data', 'test', {7: value}, rows=20)
    out = tmp_path / 'eval.json'
    with pytest.raises(ValueError) as err:
        cli.main(['eval', '--model', 'skipnet_resnet38_cifar', '--dataset', str(tmp_path / 'data'), '-b', '8',
                  '--output', str(out)])
    text = str(err.value)
    assert "split 'test'" in text and "column 'label'" in text and 'row 7 ' in text and f'is {value},' in text
    assert f'{path} row 7 ({value})' in text and 'outside 0..9' in text
    assert not out.exists()  # never scored


def test_eval_reports_a_null_label_as_a_null_label_not_an_undecodable_image(cifar10_dir, tmp_path):
    _parquet_with_labels(cifar10_dir, tmp_path / 'data', 'test', {3: None}, rows=20)
    with pytest.raises(ValueError, match=r"column 'label', row 3 of split 'test' .* is null") as err:
        cli.main(['eval', '--model', 'skipnet_resnet38_cifar', '--dataset', str(tmp_path / 'data'), '-b', '8'])
    assert 'undecodable' not in str(err.value)


def test_training_refuses_an_out_of_range_label_as_it_streams_naming_the_file_and_row(cifar10_dir, tmp_path):
    data = tmp_path / 'data'
    path = _parquet_with_labels(cifar10_dir, data, 'train', {5: 10})
    _parquet_with_labels(cifar10_dir, data, 'test', {})
    with pytest.raises(ValueError) as err:  # torch's own error would be an IndexError naming nothing
        train(_cfg(data, tmp_path / 'out', stage='sp', steps=4, train_num_samples=40, num_classes=10,
                   shuffle_buffer=1))  # in file order: the bad row is in the first batch
    text = str(err.value)
    assert "column 'label'" in text and "split 'train'" in text and f'{path} row 5 (10)' in text


def test_training_refuses_a_null_label_as_a_null_label(cifar10_dir, tmp_path):
    data = tmp_path / 'data'
    _parquet_with_labels(cifar10_dir, data, 'train', {2: None})
    _parquet_with_labels(cifar10_dir, data, 'test', {})
    with pytest.raises(ValueError, match='is null'):
        train(_cfg(data, tmp_path / 'out', stage='base', steps=2, train_num_samples=40, num_classes=10,
                   shuffle_buffer=1))


def test_a_loader_checks_labels_against_the_dataset_class_count_by_default(cifar10_dir, tmp_path):
    from torchvision import transforms as T

    from timm_skipnet.data import DataSpec, LabelError, make_loader
    _parquet_with_labels(cifar10_dir, tmp_path, 'test', {1: 11}, rows=8)
    with pytest.raises(LabelError, match=r'is 11, outside 0\.\.9'):
        list(make_loader(DataSpec(str(tmp_path)), 'test', T.ToTensor(), 4))
    # calibration never reads labels: a range check there would refuse unlabelled (-1) images for nothing
    assert len(list(make_loader(DataSpec(str(tmp_path)), 'test', T.ToTensor(), 4, check_labels=False))) == 2


@pytest.mark.parametrize('where', ['train', 'eval'])
def test_a_dataset_path_that_does_not_exist_is_named_not_streamed_from_the_hub(tmp_path, where):
    missing = str(tmp_path / 'no' / 'such' / 'cifar')
    with pytest.raises(FileNotFoundError, match=f'--dataset {missing} does not exist'):
        if where == 'train':
            train(_cfg(missing, tmp_path / 'out', steps=1))
        else:
            cli.main(['eval', '--model', 'skipnet_resnet38_cifar', '--dataset', missing])


def test_a_dataset_given_as_one_parquet_file_asks_for_its_folder(cifar10_dir, tmp_path):
    path = _parquet_with_labels(cifar10_dir, tmp_path, 'test', {}, rows=4)
    with pytest.raises(ValueError, match='is a file: pass the folder'):
        train(_cfg(path, tmp_path / 'out', steps=1))


# ---- model files ----------------------------------------------------------------------------------------------------
def _weights(tmp_path):
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _load_with(how, path, tmp_path, cifar10_dir=None):
    if how == 'initial_checkpoint':
        from timm_skipnet.train import build_model
        build_model(_cfg('unused', tmp_path / 'out', initial_checkpoint=str(path)), 10)
    elif how == 'eval_checkpoint':
        cli.main(['eval', '--model', 'skipnet_resnet38_cifar', '--checkpoint', str(path), '--dataset', cifar10_dir,
                  '--max-images', '8'])
    else:  # an exported folder
        cli.main(['eval', '--model', f'local-dir:{path}', '--dataset', cifar10_dir, '--max-images', '8'])


@pytest.mark.parametrize('how', ['initial_checkpoint', 'eval_checkpoint', 'local_dir'])
def test_a_truncated_safetensors_file_is_named(cifar10_dir, tmp_path, how):
    model, path = _weights(tmp_path)
    if how == 'local_dir':
        from timm_skipnet.export import export_folder
        export_folder(model, str(tmp_path / 'folder'), dict(num_classes=10, gate_type='rnn'), card=False)
        path, target = tmp_path / 'folder', tmp_path / 'folder' / 'model.safetensors'
    else:
        target = path
    data = target.read_bytes()
    target.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='truncated or corrupt') as err:
        _load_with(how, path, tmp_path, cifar10_dir)
    assert str(target) in str(err.value)


def test_a_broken_config_json_is_named(cifar10_dir, tmp_path):
    from timm_skipnet.export import export_folder
    model, _ = _weights(tmp_path)
    folder = export_folder(model, str(tmp_path / 'folder'), dict(num_classes=10, gate_type='rnn'), card=False)
    config = os.path.join(folder, 'config.json')
    with open(config, 'w') as f:
        f.write('{"architecture": "skipnet_resnet38_cifar", ')
    with pytest.raises(ValueError, match=f'{config} is not valid JSON'):
        _load_with('local_dir', folder, tmp_path, cifar10_dir)
    from timm_skipnet.hub import export_run
    with pytest.raises(ValueError, match=f'{config} is not valid JSON'):
        export_run(folder, str(tmp_path / 'again'))


class _NotATensor:
    pass


@pytest.mark.parametrize('how', ['initial_checkpoint', 'eval_checkpoint'])
def test_a_pickled_checkpoint_is_refused_by_name_without_suggesting_unsafe_loading(cifar10_dir, tmp_path, how):
    path = tmp_path / 'model.pth'
    torch.save({'state_dict': {}, 'args': _NotATensor()}, path)
    with pytest.raises(ValueError, match='refuses to unpickle') as err:
        _load_with(how, path, tmp_path, cifar10_dir)
    text = str(err.value)
    assert str(path) in text and '_NotATensor' in text
    assert not any(advice in text for advice in UNSAFE_ADVICE)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # torch's advice is not chained in either


def test_a_truncated_torch_file_is_named(cifar10_dir, tmp_path):
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    path = tmp_path / 'model.pth'
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f'{path} is not a readable torch weights file'):
        _load_with('initial_checkpoint', path, tmp_path)


# ---- command-line flags ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('setting, message', [
    (dict(batch_size=0), '--batch-size must be at least 1, got 0'),
    (dict(batch_size=-4), '--batch-size must be at least 1, got -4'),
    (dict(grad_accum_steps=0), '--grad-accum-steps must be at least 1'),
    (dict(alpha=-0.1), '--alpha .* must be >= 0'),
    (dict(steps=0), '--steps must be at least 1'),
    (dict(model_ema_update_bn=16), '--model-ema-update-bn .* add --model-ema'),
    (dict(model_ema=True, model_ema_decay=1.0, model_ema_warmup=True, model_ema_update_bn=-1),
     '--model-ema-update-bn is a number of training images'),
])
def test_training_refuses_impossible_numbers_before_any_work(cifar10_dir, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        train(_cfg(cifar10_dir, tmp_path / 'out', **{'stage': 'rl', 'steps': 1, **setting}))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('command', ['eval', 'threshold'])
@pytest.mark.parametrize('batch', ['0', '-4'])
def test_eval_and_threshold_refuse_a_batch_size_below_one(cifar10_dir, tmp_path, command, batch):
    argv = [command, '--model', 'skipnet_resnet38_cifar', '--dataset', cifar10_dir, '-b', batch]
    if command == 'threshold':
        argv += ['--gate', '0', '--rate', '0.5', '--output', str(tmp_path / 'w.safetensors')]
    with pytest.raises(ValueError, match=f'--batch-size must be at least 1, got {batch}'):
        cli.main(argv)


# ---- tensors --------------------------------------------------------------------------------------------------------
def test_rl_rewards_and_returns_are_float32_when_the_actions_are_bf16():
    from timm_skipnet.rewards import discounted_returns, hybrid_rl_loss, skip_rewards
    torch.manual_seed(0)
    actions = (torch.rand(8, 17) > 0.5).float()
    terminal = -torch.rand(8) * 3
    exact = discounted_returns(skip_rewards(actions, 0.1), terminal)
    low = discounted_returns(skip_rewards(actions.bfloat16(), 0.1), terminal)
    assert low.dtype == torch.float32 and torch.equal(low, exact)  # bf16 would round 0.1 / 17 and every sum
    logits, targets = torch.randn(8, 10), torch.randint(0, 10, (8,))
    log_probs = (-torch.rand(8, 17)).bfloat16()  # what autocast gives; exact in float32 too
    args = dict(alpha=0.1, rl_weight=0.01)
    _, _, rl32 = hybrid_rl_loss(logits, targets, actions, log_probs.float(), **args)
    _, _, rl16 = hybrid_rl_loss(logits, targets, actions.bfloat16(), log_probs, **args)
    assert rl16.dtype == torch.float32
    torch.testing.assert_close(rl16, rl32, rtol=0, atol=0)


def test_a_mean_reduced_cross_entropy_is_refused_by_the_rl_loss():
    from timm_skipnet.rewards import hybrid_rl_loss
    logits, targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    actions, log_probs = torch.ones(4, 3), -torch.rand(4, 3)
    with pytest.raises(ValueError, match=r'one loss per image \(reduction="none"\), shape \(4,\); got shape \(\)'):
        hybrid_rl_loss(logits, targets, actions, log_probs, alpha=0.1, ce_fn=torch.nn.CrossEntropyLoss())


def test_a_gate_forced_closed_never_runs_even_at_an_infinite_logit():
    from timm_skipnet.policy import THRESHOLD_LOGIT_LIMIT, decide, hard_decision
    logits = torch.tensor([float('inf'), 1e38, 5.0, -1.0]).half()  # +inf: an fp16 overflow
    closed = torch.tensor(THRESHOLD_LOGIT_LIMIT)
    assert not hard_decision(logits, closed).any() and not hard_decision(logits, THRESHOLD_LOGIT_LIMIT).any()
    assert hard_decision(logits, 0.0).tolist() == [1, 1, 1, 0]
    assert not decide(logits.float(), 'greedy', closed).action.any()


def test_a_model_never_runs_a_block_whose_gate_is_forced_closed_when_its_logit_is_infinite():
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10).eval()
    model.gates.set_constant_probability(1.0)  # every gate logit is +inf
    thresholds = [0.5] * model.num_gated_blocks
    thresholds[4] = 1.0  # forced closed
    model.set_gate_thresholds(thresholds)
    ran = []
    model.blocks()[5].register_forward_pre_hook(lambda m, args: ran.append(args[0].shape[0]))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        trace = model(x, return_trace=True)
        assert not trace.actions[:, 4].any() and trace.actions[:, 3].all()
        ran.clear()
        for batch in (x, x[:1]):  # the inference paths: batched and batch 1
            model(batch)
    assert ran == []


def test_evaluation_collect_restores_mode_and_execution_when_a_batch_fails():
    from timm_skipnet.evaluation import collect
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    model.set_execution('dense')
    model.train()

    def loader():
        yield torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), 0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(model, loader())
    assert model.training and model.execution == 'dense'


def test_dense_training_updates_the_projection_shortcut_batchnorm_once_per_step():
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    model.set_execution('dense')
    model.train()
    block = model.layer2[0]  # gated, with a projection shortcut
    assert block.downsample is not None
    bn = block.downsample[1]
    seen = []
    block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    before = bn.running_mean.clone()
    model(torch.randn(8, 3, 32, 32), gate_policy='straight_through')
    with torch.no_grad():
        z = block.downsample[0](seen[0])
    expected = (1 - bn.momentum) * before + bn.momentum * z.mean((0, 2, 3))
    assert int(bn.num_batches_tracked) == 1  # twice: effective momentum 0.19 instead of 0.1
    torch.testing.assert_close(bn.running_mean, expected)


def test_dense_training_with_gradient_checkpointing_counts_the_projection_once_and_backpropagates_the_same():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
        model.set_grad_checkpointing(ckpt)
        model.set_execution('dense')
        model.train()
        out = model(x, gate_policy='straight_through')
        assert int(model.layer2[0].downsample[1].num_batches_tracked) == 1
        out.sum().backward()  # the recompute must see the same tensors as the forward
        grads.append(model.layer2[0].downsample[0].weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize('where', ['gates_forward_hook', 'gates_forward_pre_hook', 'global_forward_pre_hook'])
def test_the_in_place_scatter_never_overwrites_a_tensor_a_hook_kept(where):
    from torch.nn.modules.module import register_module_forward_pre_hook
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10).eval()
    randomize_gates(model, seed=1)
    kept = []

    def keep(t):
        kept.append((t, t.clone()))

    if where == 'gates_forward_hook':
        handle = model.gates.register_forward_hook(lambda m, args, out: keep(args[1]))
    elif where == 'gates_forward_pre_hook':
        handle = model.gates.register_forward_pre_hook(lambda m, args: keep(args[1]))
    else:  # any module called with (index, x, state): the gates, in whatever form the model runs them
        handle = register_module_forward_pre_hook(
            lambda m, args: keep(args[1]) if len(args) == 3 and torch.is_tensor(args[1]) and args[1].dim() == 4
            else None)
    try:
        with torch.no_grad():
            trace = model(torch.randn(16, 3, 32, 32), return_trace=True)
            actions = trace.actions
            model(torch.randn(16, 3, 32, 32))  # the inference path
    finally:
        handle.remove()
    partial = ((actions.sum(0) > 0) & (actions.sum(0) < 16)).any()
    assert partial and kept  # some block ran for some images only: the case that scatters
    assert all(torch.equal(t, copy) for t, copy in kept)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.fixture
def two_step_run(cifar10_dir, tmp_path):
    """An rl run of 2 updates, checkpointed after each: (run dir, its step-2 weights, config kwargs)."""
    kw = dict(stage='rl', steps=2, checkpoint_every=1, sched='none', lr=0.02)
    run = tmp_path / 'run'
    train(_cfg(cifar10_dir, run, **kw))
    ckpts = run / 'checkpoints'
    final = load_file(str(ckpts / 'step_0000002' / 'model.safetensors'))
    shutil.rmtree(ckpts / 'step_0000002')
    (ckpts / 'latest').write_text('step_0000001')
    AcceleratorState._reset_state(True)
    return run, final, kw


def test_resume_restores_the_random_state_from_the_trainers_own_safe_file(cifar10_dir, two_step_run):
    run, final, kw = two_step_run
    step1 = run / 'checkpoints' / 'step_0000001'
    assert (step1 / 'rng_state_0.safetensors').exists()
    os.remove(step1 / 'random_states_0.pkl')  # Accelerate's pickle: not needed
    train(_cfg(cifar10_dir, run, **dict(kw, resume=str(run))))
    resumed = load_file(str(run / 'checkpoints' / 'step_0000002' / 'model.safetensors'))
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    with open(run / 'checkpoints' / 'step_0000002' / 'trainer_state.json') as f:
        assert json.load(f)['reproducible'] is True


@pytest.mark.parametrize('damage', ['missing', 'refused'])
def test_resume_refuses_a_checkpoint_whose_random_state_is_lost_unless_told_and_then_records_it(
        cifar10_dir, two_step_run, damage):
    run, final, kw = two_step_run
    step1 = run / 'checkpoints' / 'step_0000001'
    os.remove(step1 / 'rng_state_0.safetensors')  # a checkpoint written before the trainer kept its own copy
    if damage == 'missing':
        os.remove(step1 / 'random_states_0.pkl')
    else:  # a pickle the weights-only loader refuses
        torch.save({'random_state': _NotATensor()}, step1 / 'random_states_0.pkl')
    with pytest.raises(ValueError, match='cannot restore the random state of process 0') as err:
        train(_cfg(cifar10_dir, run, **dict(kw, resume=str(run))))
    assert ('is missing' if damage == 'missing' else 'was refused') in str(err.value)
    assert '--resume-without-rng-state' in str(err.value)
    assert not (run / 'checkpoints' / 'step_0000002').exists()
    AcceleratorState._reset_state(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        train(_cfg(cifar10_dir, run, **dict(kw, resume=str(run), resume_without_rng_state=True)))
    assert any('no longer' in str(w.message) or 'diverge' in str(w.message) for w in caught)
    with open(run / 'checkpoints' / 'step_0000002' / 'trainer_state.json') as f:
        assert json.load(f)['reproducible'] is False


def test_a_broken_trainer_state_is_named_on_resume(cifar10_dir, two_step_run):
    run, _, kw = two_step_run
    state = run / 'checkpoints' / 'step_0000001' / 'trainer_state.json'
    state.write_text('{"global_step": 1, ')
    with pytest.raises(ValueError, match=f'{state} is not valid JSON'):
        train(_cfg(cifar10_dir, run, **dict(kw, resume=str(run))))


# ---- weight averaging -----------------------------------------------------------------------------------------------
def test_update_bn_measures_what_torch_swa_utils_update_bn_measures():
    from torch.optim.swa_utils import update_bn as torch_update_bn

    from timm_skipnet.train import update_bn
    torch.manual_seed(0)
    a = timm.create_model('skipnet_resnet38_cifar', num_classes=10).eval()
    b = timm.create_model('skipnet_resnet38_cifar', num_classes=10).eval()
    b.load_state_dict(a.state_dict())
    batches = [torch.randn(6, 3, 32, 32) for _ in range(3)]
    assert update_bn(a, batches, gate_policy='straight_through') == 18  # what torch's runs: the training forward
    torch_update_bn(batches, b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)
    assert not a.training and all(m.momentum == 0.1 for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_update_bn_leaves_frozen_gates_statistics_alone():
    from timm_skipnet.train import update_bn
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10, gate_type='ff1')
    gate_bns = {n: m.running_mean.clone() for n, m in model.gates.named_modules()
                if isinstance(m, torch.nn.BatchNorm2d)}
    assert gate_bns
    update_bn(model, [torch.randn(4, 3, 32, 32)], gate_policy='greedy', keep_gates=True)
    for n, m in model.gates.named_modules():
        if n in gate_bns:
            assert torch.equal(m.running_mean, gate_bns[n]) and int(m.num_batches_tracked) == 0
    assert int(model.layer1[0].bn1.num_batches_tracked) == 1


def test_swa_with_update_bn_delivers_the_average_with_recomputed_statistics(cifar10_dir, tmp_path):
    from timm_skipnet.hub import find_run_files
    kw = dict(stage='sp', steps=2, sched='none', lr=0.02, model_ema=True, model_ema_decay=1.0,
              model_ema_warmup=True, model_ema_warmup_power=1.0, model_ema_update_bn=16, export=True)
    train(_cfg(cifar10_dir, tmp_path, **kw))
    ckpt = tmp_path / 'checkpoints' / 'step_0000002'
    average = load_file(str(ckpt / 'model_ema.safetensors'))
    recomputed = load_file(str(ckpt / 'model_ema_bn.safetensors'))
    exported = load_file(str(tmp_path / 'model' / 'model.safetensors'))
    stats = [k for k in average if k.endswith('running_mean')]
    assert all(torch.equal(average[k], recomputed[k]) for k in average if 'running_' not in k and 'batches' not in k)
    assert any(not torch.equal(average[k], recomputed[k]) for k in stats)
    assert all(int(recomputed[k]) == 2 for k in recomputed if k.endswith('num_batches_tracked') and
               not k.startswith('gates.'))  # 16 images in batches of 8, a cumulative mean from a reset
    assert all(torch.equal(exported[k], recomputed[k]) for k in exported)
    assert find_run_files(str(tmp_path))['weights'] == str(ckpt / 'model_ema_bn.safetensors')
