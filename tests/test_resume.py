"""Resume: after an epoch or a stop inside one, equal to the uninterrupted run; in samples, also with another
batch size or number of ranks; checkpoints of the old code; the logs of a resumed epoch."""
import glob
import json
import os
import re
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    args_for,
    kwargs_flags,
    make_image_folder,
    make_teacher_checkpoint,
    no_long_work,
    no_training,
    read_log,
    run_until_stopped,
    tiny_args,
    torchrun,
)

import main_finetune
from modes import get_mode
from util.checkpoint import resume_step
from util.datasets import RobustImageFolder
from util.errors import UserError
from util.losses import TransferCriterion
from util.pretrained import read_checkpoint
from util.run_control import Preempted, clear_stop, request_stop


def train(workdir, name, *extra, epochs=2):
    out = str(workdir.root / name)
    stats = main_finetune.run(args_for(workdir, out, *extra, epochs=epochs))
    return out, stats


def trained_indices(monkeypatch) -> list:
    """Record every training sample the loader reads (num_workers 0: in this process)."""
    seen, getitem = [], RobustImageFolder.__getitem__

    def recording(self, index):
        if os.path.basename(self.root) == 'train':
            seen.append(index)
        return getitem(self, index)

    monkeypatch.setattr(RobustImageFolder, '__getitem__', recording)
    return seen


# ---- resume is exact --------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_two_epochs_equals_three_uninterrupted(workdir):
    extra = ['--mode', 'distill', '--drop_path', '0.2', '--ema', '0.9', '--mixup', '0.8', '--cutmix', '1.0',
             '--reprob', '0.25', '--aa', 'rand-m9-mstd0.5-inc1', '--num_workers', '1', '--save_every', '1']
    full, _ = train(workdir, 'resume_full', *extra, epochs=3)
    out = str(workdir.root / 'resume_part')
    main_finetune.run(args_for(workdir, out, *extra, '--resume', os.path.join(full, 'checkpoint-1.pth'), epochs=3))
    a = read_checkpoint(os.path.join(full, 'checkpoint.pth'))
    b = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert a['epoch'] == b['epoch'] == 2
    for key in ('model', 'model_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'
    for pid, state in a['optimizer']['state'].items():
        assert torch.equal(state['exp_avg_sq'], b['optimizer']['state'][pid]['exp_avg_sq'])
    # the resumed run trained only the third epoch, and logged the same numbers for it
    assert [e['epoch'] for e in read_log(out)] == [2]
    assert read_log(out)[-1] == read_log(full)[-1]


@pytest.mark.slow
def test_stop_mid_epoch_saves_position_and_resume_equals_uninterrupted(workdir, monkeypatch, capsys):
    extra = ['--mode', 'distill', '--drop_path', '0.2', '--ema', '0.9', '--mixup', '0.8', '--print_freq', '1',
             '--checkpoint_minutes', '0']
    full, _ = train(workdir, 'stopped_full', *extra)
    forward, calls = TransferCriterion.forward, [0]

    def preempt_in_second_epoch(self, outputs, targets):
        calls[0] += 1
        if calls[0] == 6 + 3:  # the signal arrives during epoch 1, step 2 (0-based)
            request_stop()
        return forward(self, outputs, targets)

    monkeypatch.setattr(TransferCriterion, 'forward', preempt_in_second_epoch)
    with pytest.raises(Preempted) as stop:
        train(workdir, 'stopped_part', *extra)
    clear_stop()
    monkeypatch.undo()
    assert (stop.value.epoch, stop.value.step) == (1, 3)
    out = str(workdir.root / 'stopped_part')
    saved = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert (saved['epoch'], saved['step']) == (1, 3)
    first = capsys.readouterr().out
    main_finetune.run(args_for(workdir, out, *extra, '--resume', 'allow'))
    second = capsys.readouterr().out
    pattern = r'Epoch \[1\] \[(\d)/6\]'
    steps = re.findall(pattern, first.split('stopped_part')[-1]) + re.findall(pattern, second)
    assert steps == ['1', '2', '3', '4', '5', '6']  # every step of the epoch once: none twice, none skipped
    a = read_checkpoint(os.path.join(full, 'checkpoint.pth'))
    b = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    for key in ('model', 'model_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'


# ---- a stop in the last --print_freq window of an epoch -------------------------------------------------
def test_stop_in_last_window_saves_epoch_end_and_resumes(workdir, monkeypatch):
    out = workdir.root / 'last_window'
    # print_freq 4 of 6 steps: the read-backs are at steps 4 and 6; the stop arrives during step 5
    stop = run_until_stopped(workdir, monkeypatch, out, 5, '--print_freq', '4')
    assert (stop.epoch, stop.step) == (0, 6)
    saved = read_checkpoint(str(out / 'checkpoint.pth'))
    assert (saved['epoch'], saved['step']) == (0, None)  # an end-of-epoch checkpoint
    assert [e['epoch'] for e in read_log(str(out))] == [0]
    main_finetune.run(args_for(workdir, out, '--print_freq', '4', '--resume', 'allow'))
    assert [e['epoch'] for e in read_log(str(out))] == [0, 1]

    # the other end: a checkpoint written by the old code at step == steps_per_epoch must resume too
    old = {k: v for k, v in saved.items() if k not in ('samples', 'world_size', 'partial_epoch', 'rng_per_rank')}
    old['step'] = 6
    torch.save(old, str(out / 'old.pth'))
    resumed = workdir.root / 'old_resumed'
    main_finetune.run(args_for(workdir, resumed, '--print_freq', '4', '--resume', str(out / 'old.pth')))
    assert [e['epoch'] for e in read_log(str(resumed))] == [0, 1]
    assert read_checkpoint(str(resumed / 'checkpoint.pth'))['epoch'] == 1


# ---- mid-epoch resume with another batch size or number of ranks; logs ------------------------------
@pytest.fixture(scope='module')
def mid_epoch(workdir):
    """An uninterrupted 2-epoch run, and the same run stopped after 2 steps (16 samples) of epoch 1."""
    mp = pytest.MonkeyPatch()
    full = workdir.root / 'mid_full'
    main_finetune.run(args_for(workdir, full))
    part = workdir.root / 'mid_part'
    stop = run_until_stopped(workdir, mp, part, 6 + 2)
    assert (stop.epoch, stop.step) == (1, 2)
    return SimpleNamespace(full=full, part=part)


def resume_copy(workdir, mid_epoch, name: str):
    out = workdir.root / name
    shutil.copytree(mid_epoch.part, out)
    for events in glob.glob(str(out / 'events.out.tfevents.*')):
        os.remove(events)
    return out


def test_resume_step_rules():
    saved = {'epoch': 1, 'step': 2, 'samples': 16, 'world_size': 1, 'args': {'batch_size': 8, 'world_size': 1}}
    assert resume_step(saved, 'c.pth', 8, 1, 6) == (1, 2)
    assert resume_step(saved, 'c.pth', 2, 4, 6) == (1, 2)  # 8 a step on 4 ranks: the same positions
    assert resume_step(saved, 'c.pth', 4, 2, 1) == (1, 1)  # an epoch of one step of 8: nothing left of it
    assert resume_step({**saved, 'step': None}, 'c.pth', 12, 1, 4) == (2, 0)
    # a checkpoint of the old code: no 'samples', position from step x batch x world_size in args
    old = {'epoch': 0, 'step': 3, 'args': {'batch_size': 4, 'world_size': 2}}
    assert resume_step(old, 'c.pth', 8, 1, 6) == (0, 3)
    with pytest.raises(UserError, match=r"24 samples of epoch 0 .*--batch_size 4 on 2 rank"):
        resume_step(old, 'c.pth', 16, 1, 3)


def test_mid_epoch_checkpoint_records_samples_and_world_size(mid_epoch):
    saved = read_checkpoint(str(mid_epoch.part / 'checkpoint.pth'))
    assert (saved['epoch'], saved['step'], saved['samples'], saved['world_size']) == (1, 2, 16, 1)


def test_same_batch_resume_logs_whole_epoch_and_purges_exactly(workdir, mid_epoch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = workdir.root / 'mid_same'
    shutil.copytree(mid_epoch.part, out)
    main_finetune.run(args_for(workdir, out, '--resume', 'allow'))
    # the epoch's log line covers all 6 steps, as the uninterrupted run's
    resumed, full = read_log(str(out)), read_log(str(mid_epoch.full))
    assert [e['epoch'] for e in resumed] == [0, 1]
    assert resumed[1]['train_loss'] == pytest.approx(full[1]['train_loss'], rel=1e-6)
    # TensorBoard keeps the points trained before the stop and drops none twice
    events = EventAccumulator(str(out))
    events.Reload()
    steps = [e.step for e in events.Scalars('train/loss')]
    assert steps == [333, 666, 1000, 1333, 1666, 2000]


@pytest.mark.parametrize('batch,start_step,steps', [(4, 4, 12), (16, 1, 3)])
def test_resume_with_another_batch_size_trains_each_sample_once(workdir, mid_epoch, monkeypatch, capsys, batch,
                                                                start_step, steps):
    out = resume_copy(workdir, mid_epoch, f'mid_batch{batch}')
    seen = trained_indices(monkeypatch)
    main_finetune.run(args_for(workdir, out, '--resume', 'allow', '--batch_size', str(batch), '--print_freq', '1'))
    text = capsys.readouterr().out
    assert f'epoch 1, step {start_step} of {steps} (16 samples' in text
    done = re.findall(rf'Epoch \[1\] \[(\d+)/{steps}\]', text)
    assert done == [str(i) for i in range(start_step + 1, steps + 1)]
    first_part = read_checkpoint(str(mid_epoch.part / 'checkpoint.pth'))
    assert first_part['samples'] == 16
    # the stopped run trained the first 16 of epoch 1's order; the resumed one exactly the other 32
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0 + 1)).tolist()
    assert sorted(seen) == sorted(order[16:])
    assert len(read_log(str(out))) == 2


def test_resume_with_a_batch_size_that_does_not_divide_the_position_is_refused(workdir, mid_epoch):
    out = resume_copy(workdir, mid_epoch, 'mid_batch12')
    before = open(out / 'checkpoint.pth', 'rb').read()
    with pytest.raises(UserError, match=r"(?s)16 samples of epoch 1.*--batch_size 12.*--batch_size 8"):
        main_finetune.run(args_for(workdir, out, '--resume', 'allow', '--batch_size', '12'))
    assert open(out / 'checkpoint.pth', 'rb').read() == before


@pytest.mark.slow
def test_resume_one_rank_checkpoint_on_two_ranks(workdir, mid_epoch):
    out = resume_copy(workdir, mid_epoch, 'mid_ddp')
    proc = torchrun(args_for(workdir, out, '--resume', 'allow', '--print_freq', '1'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 48 images on 2 ranks of 8: 3 steps an epoch; 16 samples done is exactly step 1
    assert 'epoch 1, step 1 of 3 (16 samples' in proc.stdout
    assert re.findall(r'Epoch \[1\] \[(\d)/3\]', proc.stdout) == ['2', '3']
    assert [e['epoch'] for e in read_log(str(out))] == [0, 1]


# ---- checkpoints of an earlier revision ----------------------------------------------------------------
LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'checkpoints_61197d7')


@pytest.fixture
def one_thread():
    """The stored checkpoints were written on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def distance_from_recorded(resumed: dict, recorded: dict, start: dict) -> float:
    """|resumed - recorded| / |recorded - start| over all tensors: how far the continuation lands from the recorded
    one, as a share of how far the recorded run moved from the checkpoint."""
    def norm(a, b):
        return sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in recorded) ** 0.5
    return norm(resumed, recorded) / norm(recorded, start)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:--finetune .* must hold the same weights')  # the recorded teacher is gone
@pytest.mark.parametrize('name', ['epoch0.pth', 'mid_epoch1.pth'])
def test_checkpoints_of_revision_61197d7_continue_the_recorded_run(tmp_path, one_thread, name):
    """A checkpoint written before the configuration / checkpointer restructuring (end of an epoch, and inside
    one) continues to the weights the uninterrupted run of that revision ended with.

    Those weights were computed on one machine; another CPU's kernels round differently, and Adam's
    normalisation carries the difference into the weights: on a second machine the continuation landed 0.1% of
    the way the run moved (model; EMA 0.02%) from the recorded weights, where a resume that drops the optimizer
    state, the data order's RNG or the EMA lands 12% to 240% away (model or EMA). The bound is 1%; on the machine
    that recorded them, the weights were equal bit for bit."""
    with open(os.path.join(LEGACY, 'command.json')) as f:
        command = json.load(f)
    data = make_image_folder(str(tmp_path / 'data'))
    teacher = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'), **command['arch'])
    extra = [teacher if previous == '--finetune' else flag
             for previous, flag in zip([None] + command['extra'], command['extra'])]
    argv = tiny_args(data, str(tmp_path / 'out'), *extra, '--resume', os.path.join(LEGACY, name), epochs=2)
    argv[argv.index('--model_kwargs') + 1:argv.index('--input_size')] = kwargs_flags(command['arch'])
    main_finetune.run(argv)
    recorded = torch.load(os.path.join(LEGACY, 'final_weights.pth'), weights_only=True)
    start = read_checkpoint(os.path.join(LEGACY, name))
    resumed = read_checkpoint(str(tmp_path / 'out' / 'checkpoint.pth'))
    for key in ('model', 'model_ema'):
        assert set(resumed[key]) == set(recorded[key]), key
        distance = distance_from_recorded(resumed[key], recorded[key], start[key])
        assert distance < 0.01, f'{key}: {distance:.2%} of the way from the recorded weights'


# ---- gradient accumulation: mid-epoch checkpoints at a window's end -----------------------------------------
@pytest.mark.slow
def test_a_stop_inside_an_accumulation_window_saves_at_its_end_and_resumes_exactly(workdir, monkeypatch):
    extra = ['--accum_iter', '4', '--print_freq', '1', '--checkpoint_minutes', '0']  # windows: steps 1-4, 5-6
    full, _ = train(workdir, 'accum_full', *extra)
    out = workdir.root / 'accum_part'
    stop = run_until_stopped(workdir, monkeypatch, out, 6 + 2, *extra)  # asked during epoch 1's second step
    assert (stop.epoch, stop.step) == (1, 4)  # saved where the window's update was applied, not inside it
    saved = read_checkpoint(str(out / 'checkpoint.pth'))
    assert (saved['epoch'], saved['step']) == (1, 4)
    main_finetune.run(args_for(workdir, out, *extra, '--resume', 'allow'))
    a = read_checkpoint(os.path.join(full, 'checkpoint.pth'))
    b = read_checkpoint(str(out / 'checkpoint.pth'))
    assert a['epoch'] == b['epoch'] == 1 and b['step'] is None
    for name, value in a['model'].items():
        assert torch.equal(value, b['model'][name]), name
    for pid, state in a['optimizer']['state'].items():
        assert torch.equal(state['exp_avg'], b['optimizer']['state'][pid]['exp_avg'])
        assert state['step'] == b['optimizer']['state'][pid]['step'] == 4  # 2 windows an epoch, both applied


# ---- checkpoints of revision 7d1a766: continue, evaluate, export ------------------------------------------
LEGACY_7D1A766 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'checkpoints_7d1a766')


def legacy_7d1a766(name: str) -> str:
    return os.path.join(LEGACY_7D1A766, name)


def legacy_7d1a766_json(name: str) -> dict:
    with open(legacy_7d1a766(name)) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def inputs_7d1a766(tmp_path_factory):
    """The data and the teacher of the runs that wrote tests/data/checkpoints_7d1a766 (both generated, seeded)."""
    root = tmp_path_factory.mktemp('inputs_7d1a766')
    arch = legacy_7d1a766_json('command.json')['arch']
    return SimpleNamespace(data=make_image_folder(str(root / 'data')),
                           teacher=make_teacher_checkpoint(str(root / 'teacher.pth'), **arch), arch=arch)


def argv_7d1a766(inputs, out, *extra, epochs) -> list[str]:
    """tiny_args on the writing runs' data with the checkpoints' architecture."""
    argv = tiny_args(inputs.data, str(out), *extra, epochs=epochs)
    argv[argv.index('--model_kwargs') + 1:argv.index('--input_size')] = kwargs_flags(inputs.arch)
    return argv


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:--finetune .* must hold the same weights')  # the recorded teacher is gone
@pytest.mark.parametrize('name', ['distill_epoch0.pth', 'distill_mid_epoch1.pth'])
def test_checkpoints_of_revision_7d1a766_continue_the_recorded_run(tmp_path, one_thread, inputs_7d1a766, name):
    """A distill checkpoint with an EMA of revision 7d1a766 (end of an epoch, and inside one) continues to the
    weights its uninterrupted run ended with, within 1% of the way that run moved from the checkpoint (the
    measure and its reasons: test_checkpoints_of_revision_61197d7_continue_the_recorded_run)."""
    command = legacy_7d1a766_json('command.json')
    extra = ['--finetune', inputs_7d1a766.teacher, *command['distill'], '--resume', legacy_7d1a766(name)]
    main_finetune.run(argv_7d1a766(inputs_7d1a766, tmp_path / 'out', *extra, epochs=command['epochs']['distill']))
    recorded = torch.load(legacy_7d1a766('distill_final_weights.pth'), weights_only=True)
    start = read_checkpoint(legacy_7d1a766(name))
    resumed = read_checkpoint(str(tmp_path / 'out' / 'checkpoint.pth'))
    assert resumed['epoch'] == command['epochs']['distill'] - 1 and resumed['step'] is None
    for key in ('model', 'model_ema'):
        assert set(resumed[key]) == set(recorded[key]), key
        distance = distance_from_recorded(resumed[key], recorded[key], start[key])
        assert distance < 0.01, f'{key}: {distance:.2%} of the way from the recorded weights'


@pytest.mark.parametrize('name,recorded', [('distill_epoch0.pth', 'distill_epoch0.pth'),
                                           ('distill_mid_epoch1.pth', 'distill_mid_epoch1.pth (--eval of 7d1a766)'),
                                           ('copy_final.pth', 'copy_final.pth')])
def test_checkpoints_of_revision_7d1a766_evaluate_to_the_recorded_numbers(tmp_path, one_thread, inputs_7d1a766, name,
                                                                          recorded):
    """main_finetune.py --eval --resume CKPT on a checkpoint of revision 7d1a766 (a distill student with its EMA;
    a copy student, which holds its teacher) gives the evaluation its run recorded: top-1 equal, loss within
    1e-4 relative, for the raw weights and the EMA's."""
    expected = legacy_7d1a766_json('expected.json')[recorded]
    stats = main_finetune.run(['--eval', '--resume', legacy_7d1a766(name), '--data_path', inputs_7d1a766.data,
                               '--output_dir', str(tmp_path / 'eval'), '--device', 'cpu', '--batch_size', '8',
                               '--num_workers', '0'])
    prefixes = ('test_', 'ema_test_') if name.startswith('distill') else ('test_',)
    assert set(prefixes) == {p for p in ('test_', 'ema_test_') if p + 'loss' in expected}
    for prefix in prefixes:
        assert stats[prefix + 'acc1'] == expected[prefix + 'acc1'], prefix
        assert stats[prefix + 'loss'] == pytest.approx(expected[prefix + 'loss'], rel=1e-4), prefix


@pytest.mark.parametrize('ema', [False, True])
def test_the_distill_student_of_revision_7d1a766_exports_to_a_timm_model_with_its_logits(tmp_path, ema):
    """tools/export_student.py on a distill checkpoint of revision 7d1a766 writes a timm model whose logits are
    those of the checkpoint's student (raw or EMA) loaded into a plain timm ViT of the recorded architecture;
    the raw student's are also those the writing revision computed."""
    import timm

    from tools.export_student import export

    arch = legacy_7d1a766_json('command.json')['arch']
    export(legacy_7d1a766('distill_epoch0.pth'), str(tmp_path / 'exported'), use_ema=ema)
    exported = timm.create_model('local-dir:' + str(tmp_path / 'exported'), pretrained=True).eval()
    saved = torch.load(legacy_7d1a766('distill_epoch0.pth'), map_location='cpu', weights_only=False)
    vit = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=3, img_size=32, global_pool='avg',
                            **arch)
    vit.load_state_dict(saved['model_ema' if ema else 'model'])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, reference = exported(x), vit.eval()(x)
    assert torch.allclose(logits, reference, rtol=0, atol=1e-6), (logits, reference)
    if not ema:
        recorded = torch.tensor(legacy_7d1a766_json('expected.json')['distill_epoch0_student_logits']['logits'])
        assert torch.allclose(logits, recorded, rtol=1e-4, atol=1e-5), (logits, recorded)


# ---- no silent changes: a resumed run names what differs, a changed model is refused --------------------------
@pytest.fixture(scope='module')
def one_epoch_distill(workdir):
    out = str(workdir.root / 'changes')
    main_finetune.run(args_for(workdir, out, '--mode', 'distill', epochs=1))
    return out


def test_a_resumed_run_names_the_flags_that_changed(workdir, one_epoch_distill, capsys):
    out = str(workdir.root / 'changes_more')
    shutil.copytree(one_epoch_distill, out)
    main_finetune.run(args_for(workdir, out, '--mode', 'distill', '--resume', 'allow', '--blr', '1e-3',
                               '--atd_weight', '1', '--transfer_until', '1.5', epochs=2))
    printed = capsys.readouterr().out
    assert "resumed with a change: --transfer_until: None in the checkpoint's run, 1.5 from here on" in printed
    assert "resumed with a change: --epochs: 1 in the checkpoint's run, 2 from here on" in printed
    assert "resumed with a change: --atd_weight: 3 in the checkpoint's run, 1.0 from here on" in printed
    # the cosine schedule over 2 epochs instead of 1: at epoch 1 half-way down (lr 3e-3, min_lr 1e-6), not at the end
    assert ("resumed with a change: the lr at the resumed point (epoch 1.00) is 0.0015 under this command's "
            "schedule, 1e-06 under the checkpoint's (2 epochs, peak 0.003; it had 1, peak 0.003)") in printed
    assert 'resumed with a change: --data_path' not in printed and 'resumed with a change: --resume' not in printed


@pytest.mark.parametrize('flags,change', [(['--transfer_heads', '2'], 'heads: None -> [0, 1]'),
                                          (['--layer_map', '0:0,1:1'], 'layers: [0, 1, 2, 3] -> [0, 1]'),
                                          (['--map_average', 'queries'], 'map_average: none -> queries'),
                                          (['--feature_weight', '1'], 'feature_layer: None -> 2')])
def test_a_resumed_run_with_another_model_is_refused(workdir, one_epoch_distill, flags, change):
    with pytest.raises(UserError, match=re.escape(change)):
        main_finetune.run(args_for(workdir, one_epoch_distill, '--mode', 'distill', '--resume', 'allow', *flags,
                                   epochs=2))


@pytest.mark.parametrize('flags,message', [(['--nb_classes', '7'], '--nb_classes 7: the evaluated checkpoint'),
                                           (['--transfer_heads', '1'], '--transfer_heads 1: the evaluated checkpoint'),
                                           (['--mode', 'copy'], '--mode copy: the evaluated checkpoint')])
def test_eval_refuses_model_flags_that_contradict_the_checkpoint(workdir, one_epoch_distill, tmp_path, flags,
                                                                  message):
    argv = ['--eval', '--resume', os.path.join(one_epoch_distill, 'checkpoint.pth'), '--data_path', workdir.data,
            '--output_dir', str(tmp_path / 'eval'), '--device', 'cpu', '--num_workers', '0', *flags]
    with pytest.raises(UserError, match=re.escape(message)):
        main_finetune.run(argv)


def test_student_init_on_resume_is_said_unused_and_not_recorded(workdir, one_epoch_distill, tmp_path, capsys):
    out = str(tmp_path / 'run')
    shutil.copytree(one_epoch_distill, out)
    main_finetune.run(args_for(workdir, out, '--mode', 'distill', '--resume', 'allow', '--student_init',
                               workdir.teacher, epochs=2))
    assert f"--student_init {workdir.teacher} is not used when resuming" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), map_location='cpu', weights_only=False)
    assert ckpt['args']['student_init'] in (None, '')  # the student started from random weights


# ---- moved from test_bad_input.py: resuming with another mode or teacher, a finished run ---------------------------
@pytest.mark.slow
def test_resume_without_the_runs_mode_is_refused_naming_it(small_work, pair_runs, monkeypatch):
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    run = pair_runs['distill']
    for mode in ([], ['--mode', 'copy']):
        with pytest.raises(UserError) as err:
            main_finetune.run(tiny_args(small_work.data, run.out, '--resume', run.checkpoint, '--finetune', run.teacher,
                                        *mode, epochs=2))
        assert 'the checkpoint is of a --mode distill run' in str(err.value) and 'give --mode distill' in str(err.value)


def test_resume_mode_of_older_checkpoints_none_means_plain():
    for recorded in (None, '', 'none'):
        get_mode('none').check_resumed({'mode': recorded}, 'old.pth')
        with pytest.raises(UserError, match=r"--resume old.pth: the checkpoint is of a --mode none run, but this "
                                            r"command has --mode distill: give --mode none"):
            get_mode('distill').check_resumed({'mode': recorded}, 'old.pth')
    get_mode('distill').check_resumed({}, 'mae_checkpoint.pth')  # records no args of this project: nothing to check


@pytest.mark.slow
def test_resume_with_another_teacher(small_work, pair_runs, tmp_path, monkeypatch):
    """Resumes of finished one-epoch runs (with --epochs 1 they stop after the checks: nothing to do)."""
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    distill, copy = pair_runs['distill'], pair_runs['copy']

    def resume(run, teacher):  # with the run's own model flags (the copy run copies layers 0-2)
        own = ['--end_layer', '-1'] if run is copy else []
        return main_finetune.run(tiny_args(small_work.data, run.out, '--resume', run.checkpoint, '--mode',
                                           os.path.basename(run.out), '--finetune', teacher, *own, epochs=1))
    other = str(tmp_path / 'other_teacher.pth')
    make_teacher_checkpoint(other, sharpen=2.0)
    with pytest.raises(UserError) as err:  # distill: the teacher is read from --finetune, not the checkpoint
        resume(distill, other)
    message = str(err.value)
    assert f"--finetune {other} is not the teacher" in message and f"Give --finetune {distill.teacher}" in message

    same_bytes = str(tmp_path / 'moved' / 'teacher.pth')
    os.makedirs(os.path.dirname(same_bytes))
    shutil.copy(distill.teacher, same_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resume(distill, same_bytes) == {}  # the same weights under another path

    with pytest.warns(UserWarning, match='not used when resuming.*the teacher.s weights come from the checkpoint'):
        assert resume(copy, other) == {}  # copy: the checkpoint holds the teacher it uses

    moved = str(tmp_path / 'recorded_teacher_gone.pth')
    shutil.move(distill.teacher, moved)
    try:
        with pytest.warns(UserWarning, match='which no longer exists.*must hold the same weights'):
            assert resume(distill, moved) == {}
    finally:
        shutil.move(moved, distill.teacher)


def test_resume_of_a_finished_run_says_nothing_to_do(floor_run, capsys, monkeypatch):
    no_long_work(monkeypatch, 'build_dataset')
    ckpt = os.path.join(floor_run.out, 'checkpoint.pth')
    stats = main_finetune.run(tiny_args(floor_run.data, floor_run.out, '--resume', ckpt, epochs=1))
    assert stats == {}
    assert 'nothing to do' in capsys.readouterr().out


# ---- moved from test_run_folder.py: which checkpoint a resume continues; a mid-epoch one only the same permutation ---
@pytest.mark.slow
def test_resume_allow_without_checkpoint_pth_names_the_numbered_one(workdir, monkeypatch):
    out = workdir.root / 'numbered_only'
    main_finetune.run(args_for(workdir, out, '--save_every', '1', epochs=1))
    os.remove(out / 'checkpoint.pth')
    no_training(monkeypatch)
    with pytest.raises(UserError, match=r"holds a run without checkpoint.pth .*--resume .*checkpoint-0\.pth"):
        main_finetune.run(args_for(workdir, out, '--resume', 'allow'))


@pytest.mark.slow
@pytest.mark.parametrize('change', ['seed', 'data'])
def test_mid_epoch_resume_with_another_seed_or_data_is_refused(workdir, mid_epoch, monkeypatch, change):
    out = workdir.root / f'mid_{change}'
    shutil.copytree(mid_epoch.part, out)
    argv = args_for(workdir, out, '--resume', 'allow')
    if change == 'seed':
        argv += ['--seed', '1']
        expected = r"--seed 0 then, 1 now"
    else:
        data = workdir.root / 'data_changed'
        shutil.copytree(workdir.data, data)
        first = sorted(os.listdir(data / 'train' / 'class_0'))[0]
        os.rename(data / 'train' / 'class_0' / first, data / 'train' / 'class_0' / ('z' + first))
        argv[argv.index('--data_path') + 1] = str(data)
        expected = r"the training set: 48 images then, 48 now \(same count, other files\)"
    no_training(monkeypatch)
    with pytest.raises(UserError, match=rf"(?s)stopped inside epoch 1.*{expected}.*end-of-epoch checkpoint"):
        main_finetune.run(argv)


@pytest.mark.slow
def test_mid_epoch_resume_of_a_moved_copy_of_the_same_data_continues(workdir, mid_epoch):
    out = workdir.root / 'mid_moved'
    shutil.copytree(mid_epoch.part, out)
    moved = workdir.root / 'data_moved'
    shutil.copytree(workdir.data, moved)
    argv = args_for(workdir, out, '--resume', 'allow')
    argv[argv.index('--data_path') + 1] = str(moved)
    main_finetune.run(argv)
    assert [e['epoch'] for e in read_log(out)] == [0, 1]


@pytest.mark.slow
def test_a_truncated_checkpoint_names_the_intact_numbered_one(workdir):
    out = workdir.root / 'truncated'
    main_finetune.run(args_for(workdir, out, '--save_every', '1', epochs=2))
    data = open(out / 'checkpoint.pth', 'rb').read()
    open(out / 'checkpoint.pth', 'wb').write(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"(?s)cannot read it .*Its folder holds .*checkpoint-1\.pth \(end of epoch "
                                        r"1\), which reads: resume from it with --resume .*checkpoint-1\.pth"):
        main_finetune.run(args_for(workdir, out, '--resume', 'allow', epochs=3))
