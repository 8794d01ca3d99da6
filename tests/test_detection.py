"""main_detection.py end to end on a generated COCO-format set: the paper's four runs (scratch, fine-tuning,
copy, distill) each train, checkpoint, resume and evaluate, with the evaluation's AP equal to pycocotools run
by hand on the predictions written; resume at an epoch boundary is bit for bit; two ranks under --dist_eval give
a single process's AP; the SLURM launcher runs a job; bad input is one error line; and the detector learns
(overfitting a handful of images raises its box AP well above the start)."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, free_port, kwargs_flags, read_log
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import main_detection
import submitit_detection
from models_vit import create_vit
from tools.make_coco_miniature import make_miniature
from util.config import Config
from util.errors import UserError

ARCH = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)
SIZE = 64  # an 8 x 8 patch grid: 4 x 4 windows in blocks 0 and 2, global attention in blocks 1 and 3


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    """A COCO-format miniature (8 training, 4 validation images, three categories with boxes and masks) and a tiny
    MAE-style teacher checkpoint at another resolution (its position embedding is resampled)."""
    root = tmp_path_factory.mktemp('detection')
    data = make_miniature(str(root / 'coco'), images=8, val_images=4, size=SIZE, seed=0, categories=3)
    torch.manual_seed(7)
    teacher = create_vit('vit_base_patch16_224', num_classes=0, global_pool='avg', img_size=32, **ARCH)
    with torch.no_grad():
        for blk in teacher.blocks:
            blk.attn.qkv.weight[:2 * 32].mul_(4.0)  # peaked maps that depend on the image
    torch.save({'model': teacher.state_dict(), 'epoch': 0}, root / 'teacher.pth')
    return root, data, str(root / 'teacher.pth')


def det_args(data: str, out: str, *extra: str, epochs: int = 1) -> list[str]:
    return ['--data_path', data, '--output_dir', out, '--model', 'vit_base_patch16_224',
            '--model_kwargs', *kwargs_flags(ARCH), '--input_size', str(SIZE), '--window_size', '4',
            '--global_blocks', '1,3', '--fpn_channels', '32', '--rois_per_image', '32', '--batch_size', '4',
            '--epochs', str(epochs), '--warmup_epochs', '0', '--lr', '1e-3', '--drop_path', '0.1',
            '--num_workers', '0', '--device', 'cpu', '--print_freq', '1', '--eval_every', '100',
            '--score_thresh', '0', *extra]  # every detection kept: an untrained detector's scores are low


RUNS = {'scratch': ('--mode', 'none'), 'finetune': ('--mode', 'none', '--finetune', '{teacher}'),
        'copy': ('--mode', 'copy', '--finetune', '{teacher}'),
        'distill': ('--mode', 'distill', '--finetune', '{teacher}')}


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = fn(*args)
    return result, out.getvalue()


def by_hand(ann_file: str, results_file: str) -> dict:
    """pycocotools on the written predictions, without this project's code."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        stats = {}
        for kind in ('bbox', 'segm'):
            ev = COCOeval(gt, gt.loadRes(results_file), kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats[kind] = ev.stats[0] * 100
    return stats


@pytest.mark.parametrize('run', list(RUNS))
def test_each_run_trains_checkpoints_resumes_and_evaluates(coco, run):
    root, data, teacher = coco
    out = str(root / run)
    flags = [f.format(teacher=teacher) for f in RUNS[run]]
    _, printed = quiet(main_detection.run, det_args(data, out, *flags))
    first = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    assert first['epoch'] == 0 and first['step'] is None and first['args']['task'] == 'detection'
    assert ('teacher' in first) == (run == 'copy')  # a copy student runs with its teacher
    assert any(k.startswith('student.blocks.0.attn') for k in first['model'])
    if run in ('copy', 'distill'):
        assert f"{run} in student layers [0, 1, 2, 3]" in printed
        assert ('loss_transfer' in printed) == (run == 'distill')
    # resumed: the second epoch, then its evaluation
    stats, printed = quiet(main_detection.run, det_args(data, out, *flags, '--resume', 'allow', epochs=2))
    assert f"resumed from {out}/checkpoint.pth" in printed
    changes = [line for line in printed.splitlines() if 'resumed with a change' in line]
    assert changes == ["resumed with a change: --epochs: 1 in the checkpoint's run, 2 from here on"], changes
    assert [line['epoch'] for line in read_log(out)] == [0, 1]
    assert all('test_bbox_AP' in line for line in read_log(out))  # each run evaluates after its last epoch
    if run == 'distill':
        assert 'train_loss_transfer' in read_log(out)[1]
    # evaluated from the checkpoint: eval_results.json, and its AP from pycocotools on the predictions written
    ev_dir = str(root / f'{run}_eval')
    # (the detector, its mode and teacher from the checkpoint: no --mode, no --finetune)
    quiet(main_detection.run, det_args(data, ev_dir, '--eval', '--resume', os.path.join(out, 'checkpoint.pth')))
    with open(os.path.join(ev_dir, 'eval_results.json')) as f:
        written = json.load(f)
    assert written['epoch'] == 1
    predictions = os.path.join(ev_dir, main_detection.PREDICTIONS)
    with open(predictions) as f:
        assert json.load(f), 'no predictions'
    hand = by_hand(os.path.join(data, 'annotations', 'instances_val2017.json'), predictions)
    assert written['test_bbox_AP'] == pytest.approx(hand['bbox'], abs=1e-9)
    assert written['test_segm_AP'] == pytest.approx(hand['segm'], abs=1e-9)
    assert written['test_bbox_AP'] == pytest.approx(read_log(out)[1]['test_bbox_AP'], abs=1e-9)


def test_resume_at_an_epoch_boundary_is_bit_for_bit(coco):
    """Two epochs straight against one epoch and a resumed one (the distill run above): the same weights."""
    root, data, teacher = coco
    out = str(root / 'distill_straight')
    quiet(main_detection.run, det_args(data, out, '--mode', 'distill', '--finetune', teacher, epochs=2))
    resumed_dir = root / 'distill'
    if not (resumed_dir / 'checkpoint.pth').exists():
        pytest.skip('needs the distill run of test_each_run_trains_checkpoints_resumes_and_evaluates')
    straight = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    resumed = torch.load(resumed_dir / 'checkpoint.pth', weights_only=True)
    assert straight['model'].keys() == resumed['model'].keys()
    for key, value in straight['model'].items():
        assert torch.equal(resumed['model'][key], value), key
    assert [{k: v for k, v in line.items() if not k.startswith('test_')} for line in read_log(out)] == \
        [{k: v for k, v in line.items() if not k.startswith('test_')} for line in read_log(str(resumed_dir))]


def test_a_stop_inside_an_epoch_continues_at_its_step(coco, monkeypatch):
    from util.run_control import Preempted, clear_stop, request_stop

    root, data, teacher = coco
    out = str(root / 'stopped')
    forward, calls = main_detection.TransferDetector.forward, [0]

    def forward_then_stop(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 1 and self.training:
            request_stop()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(main_detection.TransferDetector, 'forward', forward_then_stop)
    try:
        with pytest.raises(Preempted) as stop:
            quiet(main_detection.run, det_args(data, out, '--mode', 'distill', '--finetune', teacher))
    finally:
        clear_stop()
        monkeypatch.undo()
    assert (stop.value.epoch, stop.value.step) == (0, 1)
    assert torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)['step'] == 1
    _, printed = quiet(main_detection.run, det_args(data, out, '--mode', 'distill', '--finetune', teacher,
                                                    '--resume', 'allow'))
    assert 'epoch 0, step 1' in printed and 'Epoch [0] [2/2]' in printed and 'Epoch [0] [1/2]' not in printed


@pytest.mark.slow
def test_two_ranks_train_and_their_dist_eval_gives_a_single_process_ap(coco):
    """torchrun, two CPU processes (gloo): a distill epoch under DDP (the frozen teacher neither broadcast nor
    reduced), then the end-of-run evaluation split over the ranks (--dist_eval, one image a step each), whose AP
    equals a single process's --eval of the checkpoint (one image a step and one thread, as the ranks: the same
    arithmetic per image)."""
    root, data, teacher = coco
    two = str(root / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           os.path.join(ROOT, 'main_detection.py'),
           *det_args(data, two, '--mode', 'distill', '--finetune', teacher, '--dist_eval', '--batch_size', '1')]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('start training for 1 epochs (4 steps each)') == 1  # 8 images, 2 ranks x 1 a step
    saved = torch.load(os.path.join(two, 'checkpoint.pth'), weights_only=True)
    assert saved['world_size'] == 2 and not any(k.startswith('teacher') for k in saved['model'])
    single = str(root / 'ddp_eval_single')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quiet(main_detection.run, det_args(data, single, '--eval', '--resume', os.path.join(two, 'checkpoint.pth'),
                                           '--batch_size', '1'))
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(single, 'eval_results.json')) as f:
        alone = json.load(f)
    split = read_log(two)[0]
    for key in ('test_bbox_AP', 'test_bbox_AP50', 'test_segm_AP', 'test_segm_AP50'):
        assert alone[key] == split[key], key


def test_the_slurm_launcher_runs_a_detection_job(coco, tmp_path):
    root, data, teacher = coco
    argv = det_args(data, '', '--mode', 'distill', '--finetune', teacher)
    i = argv.index('--output_dir')
    del argv[i:i + 2]  # the job directory holds the run
    job, _ = quiet(submitit_detection.main, ['--job_dir', str(tmp_path / 'job_%j'), '--cluster', 'debug', *argv])
    job_dir = tmp_path / f'job_{job.job_id}'
    saved = torch.load(job_dir / 'checkpoint.pth', weights_only=True)
    assert saved['args']['task'] == 'detection' and saved['args']['mode'] == 'distill'
    assert [line['epoch'] for line in read_log(str(job_dir))] == [0]


# ---- bad input: one error naming the flag or file, before anything is written -------------------------------------
def broken_copy(data: str, tmp, change) -> str:
    copy = str(tmp / 'coco')
    shutil.copytree(data, copy)
    change(copy)
    return copy


def no_annotations(root: str) -> None:
    path = os.path.join(root, 'annotations', 'instances_train2017.json')
    with open(path) as f:
        ann = json.load(f)
    ann['annotations'] = []
    with open(path, 'w') as f:
        json.dump(ann, f)


@pytest.mark.parametrize('change, flags, message', [
    (lambda r: os.remove(os.path.join(r, 'annotations', 'instances_val2017.json')), (),
     r"--data_path: the annotation file .*instances_val2017.json' does not exist"),
    (lambda r: os.remove(os.path.join(r, 'train2017', sorted(os.listdir(os.path.join(r, 'train2017')))[0])), (),
     r"--data_path: 1 images listed in .* are missing from"),
    (no_annotations, (), r"no image in .*instances_train2017.json' has an annotated instance"),
    (lambda r: None, ('--nb_classes', '5'), r"--nb_classes 5 disagrees with .*, which has 3 categories"),
    (lambda r: None, ('--window_size', '3'), r"--window_size 3: does not tile the 8 x 8 patch grid"),
    (lambda r: None, ('--global_blocks', '1,7'), r"--global_blocks: blocks \[7\] are outside"),
    (lambda r: None, ('--input_size', '72'), r"--input_size 72: must be a multiple of 32"),
    (lambda r: None, ('--input_size', '0'), r"--input_size 0: must be > 0"),
    (lambda r: None, ('--blr', '-1'), r"--blr -1: must be > 0"),
    (lambda r: None, ('--weight_decay', '-1'), r"--weight_decay -1: must be a finite number >= 0"),
    (lambda r: None, ('--step_rate', '0'), r"--step_rate 0: must lie in \(0, 1\]"),
    (lambda r: None, ('--window_size', '0', '--global_blocks', '1'),
     r"--global_blocks 1: with --window_size 0 every block attends globally"),
    (lambda r: None, ('--model', 'eva02_tiny_patch14_224'),
     r"--model / --model_kwargs: the detection backbone is a timm VisionTransformer .*; Eva is another family"),
])
def test_bad_input_is_refused_naming_the_flag_or_file(coco, tmp_path, change, flags, message):
    _, data, _ = coco
    out = tmp_path / 'out'
    with pytest.raises(UserError, match=message):
        quiet(main_detection.run, det_args(broken_copy(data, tmp_path, change), str(out), '--mode', 'none', *flags))
    assert not out.exists()


def test_a_transfer_mode_without_a_teacher_and_a_command_line_error_are_one_line(coco, tmp_path):
    _, data, _ = coco
    with pytest.raises(UserError, match='--mode distill needs a teacher: give --finetune'):
        main_detection.run(det_args(data, str(tmp_path / 'out'), '--mode', 'distill'))
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'main_detection.py'),
                           *det_args(data, str(tmp_path / 'out'), '--mode', 'copy')],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.startswith('error: --mode copy needs a teacher'), done.stderr


def test_resuming_or_evaluating_another_detector_is_refused(coco, tmp_path):
    root, data, teacher = coco
    out = str(tmp_path / 'run')
    quiet(main_detection.run, det_args(data, out, '--mode', 'none'))
    with pytest.raises(UserError, match=r"--window_size 2: the run of .* has --window_size 4"):
        main_detection.run(det_args(data, out, '--mode', 'none', '--window_size', '2', '--resume', 'allow', epochs=2))
    # the same blocks in another order are the same detector
    quiet(main_detection.run, det_args(data, out, '--mode', 'none', '--global_blocks', '3,1', '--resume', 'allow',
                                       epochs=2))
    finetuned = tmp_path / 'classifier.pth'  # a checkpoint of main_finetune.py
    torch.save({'model': {}, 'optimizer': {}, 'epoch': 0, 'args': {'mode': 'none'}}, finetuned)
    with pytest.raises(UserError, match=r"is not a checkpoint of main_detection.py"):
        main_detection.run(['--eval', '--resume', str(finetuned), '--data_path', data, '--device', 'cpu',
                            '--output_dir', str(tmp_path / 'ev0')])
    other = make_miniature(str(tmp_path / 'four'), images=2, val_images=2, size=SIZE, seed=1, categories=4)
    with pytest.raises(UserError, match=r"its category ids \[1, 3, 7, 8\] are not those the detector of .* was "
                                        r"trained on \(\[1, 3, 7\]\)"):
        main_detection.run(det_args(other, str(tmp_path / 'ev'), '--eval', '--resume', os.path.join(out,
                                                                                                   'checkpoint.pth')))


# ---- the detector learns --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_overfitting_a_handful_of_images_raises_box_ap(coco):
    """Six steps of evaluation-framed images: the AP on those same images rises from about 0 to well above it."""
    from util.detection_data import build_coco_dataset, collate_detection

    root, data, _ = coco
    args = main_detection.get_args_parser().parse_args(det_args(data, '', '--mode', 'none', '--drop_path', '0'))
    cfg = Config.of(args, model_kwargs=ARCH, attention_impl='explicit', mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), amp='none')
    torch.manual_seed(0)
    model = main_detection.build_model(cfg, 3)
    images = os.path.join(data, 'train2017')
    ann = os.path.join(data, 'annotations', 'instances_train2017.json')
    dataset = build_coco_dataset(images, ann, SIZE, train=False)  # the fixed frames, to overfit
    loader = [collate_detection([dataset[i] for i in range(j, j + 4)]) for j in (0, 4)]

    def box_ap() -> float:
        stats, _ = main_detection.evaluate_detection(model, loader, dataset, torch.device('cpu'), None, False)
        return stats['bbox_AP']

    start = box_ap()
    optimizer = torch.optim.AdamW(main_detection.param_groups(model, cfg), lr=1e-3)
    criterion = main_detection.DetectionLoss(1.0)
    model.train()
    for step in range(100):
        images, targets, _ = loader[step % 2]
        lr_scale = min(1.0, (step + 1) / 10)
        for group in optimizer.param_groups:
            group['lr'] = 1e-3 * lr_scale * group.get('lr_scale', 1.0)
        loss, _ = criterion(model(images, targets), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    end = box_ap()
    print(f"box AP {start:.2f} -> {end:.2f}")
    assert start < 2.0 and end > start + 20.0, (start, end)


# ---- docs/EXPERIMENTS.md: the detection section's commands run -----------------------------------------------------
TINY_DETECTION = {'--input_size': str(SIZE), '--batch_size': '4', '--accum_iter': '1', '--epochs': '1',
                  '--num_workers': '0'}


def tiny_detection(argv: list[str]) -> list[str]:
    """A documented detection command's flags with the model, sizes and device made tiny (every other flag kept)."""
    from test_experiments_doc import replace_flags

    out = replace_flags(argv, ARCH, tuple(TINY_DETECTION))
    if '--model' not in argv and '--eval' not in argv:  # the default ViT-B, made tiny
        out += ['--model', 'vit_base_patch16_224', '--model_kwargs', *kwargs_flags(ARCH)]
    return out + [x for flag, value in TINY_DETECTION.items() for x in (flag, value)] + [
        '--window_size', '4', '--global_blocks', '1,3', '--fpn_channels', '32', '--rois_per_image', '32',
        '--score_thresh', '0', '--device', 'cpu']


@pytest.mark.slow
def test_every_detection_command_of_the_experiments_page_runs(coco, tmp_path):
    from test_experiments_doc import detection_commands, expand

    import submitit_finetune
    _, data, teacher = coco
    env = {'COCO': data, 'MAE_B': teacher, 'RUNS': str(tmp_path / 'runs'), 'JOB_DIR': str(tmp_path / 'jobs')}
    commands = detection_commands()
    assert len(commands) == 9
    for command in commands:
        argv = expand(command, env)
        if argv[0] == 'torchrun':
            quiet(main_detection.run, tiny_detection(argv[argv.index('main_detection.py') + 1:]))
        else:
            assert argv[:2] == ['python', 'submitit_detection.py'], command
            submitit_finetune.parse_args(argv[2:], main_detection, 'submitit_detection.py')  # as written
            quiet(main_detection.run, tiny_detection(argv[2:]))
    for run in ('detect_scratch_vitb', 'detect_finetune_vitb', 'detect_copy_vitb', 'detect_distill_vitb'):
        assert os.path.isfile(tmp_path / 'runs' / run / 'checkpoint.pth'), run
        assert os.path.isfile(tmp_path / 'jobs' / run / 'checkpoint.pth'), run
    with open(tmp_path / 'runs' / 'detect_distill_vitb_eval' / 'eval_results.json') as f:
        assert 'test_segm_AP' in json.load(f)


def test_the_detection_pages_commands_run(coco, tmp_path):
    """docs/DETECTION.md's first block: the miniature, a distill run on it, its evaluation (paths under
    tmp_path, the teacher file the tiny teacher, the model and sizes tiny)."""
    import re
    import shlex

    from tools import make_coco_miniature

    _, _, teacher = coco
    with open(os.path.join(ROOT, 'docs', 'DETECTION.md'), encoding='utf-8') as f:
        block = re.findall(r'```bash\n(.*?)\n```', f.read(), flags=re.S)[0]
    lines = [line.strip() for line in re.sub(r'\\\n\s*', ' ', block).splitlines()]
    commands = [shlex.split(line.replace('/tmp/', f'{tmp_path}/').replace('mae_pretrain_vit_base.pth', teacher))
                for line in lines if line and not line.startswith('#')]
    assert [c[:2] for c in commands] == [['python', 'tools/make_coco_miniature.py'], ['python', 'main_detection.py'],
                                         ['python', 'main_detection.py']]
    quiet(make_coco_miniature.main, commands[0][2:])
    for argv in commands[1:]:
        quiet(main_detection.run, tiny_detection(argv[2:]))
    with open(tmp_path / 'det_distill_eval' / 'eval_results.json') as f:
        assert json.load(f)['checkpoint'] == str(tmp_path / 'det_distill' / 'checkpoint.pth')


def test_an_undecodable_evaluation_image_is_left_out_and_counted(coco, tmp_path):
    root, data, _ = coco
    out = str(tmp_path / 'run')
    quiet(main_detection.run, det_args(data, out, '--mode', 'none'))
    broken = broken_copy(data, tmp_path, lambda r: open(os.path.join(
        r, 'val2017', sorted(os.listdir(os.path.join(r, 'val2017')))[0]), 'wb').write(b'not an image'))
    with pytest.warns(UserWarning, match='skipping undecodable image'):
        _, printed = quiet(main_detection.run, det_args(broken, str(tmp_path / 'ev'), '--eval', '--resume',
                                                        os.path.join(out, 'checkpoint.pth')))
    assert 'on 3 images (1 undecodable, left out)' in printed
    with open(tmp_path / 'ev' / 'eval_results.json') as f:
        written = json.load(f)
    assert written['test_images'] == 3 and written['test_skipped_images'] == 1


def test_a_teacher_of_another_patch_size_is_named_and_one_of_other_tokens_refused(coco, tmp_path):
    _, data, _ = coco
    torch.manual_seed(0)
    other = create_vit('vit_base_patch16_224', num_classes=0, global_pool='avg', img_size=32,
                       **{**ARCH, 'patch_size': 4})
    torch.save({'model': other.state_dict()}, tmp_path / 'patch4.pth')
    _, printed = quiet(main_detection.run, det_args(data, str(tmp_path / 'p4'), '--mode', 'distill', '--finetune',
                                                    str(tmp_path / 'patch4.pth')))
    assert 'patch embedding resampled from 4 x 4 to 8 x 8 pixels' in printed
    with pytest.raises(UserError, match=r"does not fit the model: timm cannot convert its weights"):
        main_detection.run(det_args(data, str(tmp_path / 'reg'), '--mode', 'distill', '--finetune',
                                    str(tmp_path / 'patch4.pth'), '--model_kwargs', *kwargs_flags(ARCH),
                                    'reg_tokens=4'))


@pytest.mark.parametrize('mode, flags, message', [
    ('none', ('--transfer_layers', '0-1'), '--transfer_layers: --mode none does nothing with it'),
    ('none', ('--atd_weight', '2'), '--atd_weight: --mode none does nothing with it'),
    ('copy', ('--atd_weight', '2'), '--atd_weight: --mode copy does nothing with it .it trains no transfer loss'),
    ('copy', ('--transfer_loss', 'js', '--attention_impl', 'fused'),
     '--transfer_loss: --mode copy does nothing with it .it compares no attention maps'),
    ('distill_k', ('--transfer_loss', 'reverse_kl'), '--transfer_loss: --mode distill_k does nothing with it'),
    ('distill', ('--transfer_loss', 'js', '--attention_impl', 'fused'),
     '--transfer_loss js with --attention_impl fused'),
])
def test_a_flag_the_mode_does_nothing_with_is_refused(coco, tmp_path, mode, flags, message):
    _, data, teacher = coco
    with pytest.raises(UserError, match=message):
        main_detection.run(det_args(data, str(tmp_path / 'out'), '--mode', mode, '--finetune', teacher, *flags))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('mode, impl', [('copy', 'fused'), ('distill', 'fused'), ('none', 'fused')])
def test_auto_picks_the_fused_attention_on_cuda_unless_distills_map_loss_needs_maps(coco, mode, impl):
    _, data, teacher = coco
    args = main_detection.get_args_parser().parse_args(det_args(data, '', '--mode', mode, '--finetune', teacher,
                                                                '--device', 'cuda', '--attention_impl', 'auto'))
    resolved = main_detection.resolve_args(Config.of(args, explicit_flags=['mode']), read_resume=False)[0]
    assert resolved.attention_impl == impl
    explicit = main_detection.get_args_parser().parse_args(det_args(
        data, '', '--mode', 'distill', '--finetune', teacher, '--device', 'cuda', '--transfer_loss', 'mse'))
    assert main_detection.resolve_args(Config.of(explicit, explicit_flags=['mode']),
                                       read_resume=False)[0].attention_impl == 'explicit'


def test_a_resumed_copy_run_keeps_its_teachers_origin(coco, tmp_path):
    """A copy checkpoint holds its teacher: another --finetune on resume is not used, said so, and not recorded."""
    _, data, teacher = coco
    out = str(tmp_path / 'copy')
    quiet(main_detection.run, det_args(data, out, '--mode', 'copy', '--finetune', teacher))
    with pytest.warns(UserWarning, match=r"is not the run's recorded --finetune .* the teacher's weights come from"):
        quiet(main_detection.run, det_args(data, out, '--mode', 'copy', '--finetune', str(tmp_path / 'gone.pth'),
                                           '--resume', 'allow', epochs=2))
    assert torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)['args']['finetune'] == teacher
