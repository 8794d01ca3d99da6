"""Attention Probe selection (select_wild_data.py): the scores against an independent computation, the
rankings, a selection that survives interruption, torchrun shards, the class weights of an augmented pass,
and the warning about average-pooling teachers."""
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ROOT,
    ROOT_ONLY,
    TINY_ARCH,
    free_port,
    immutable,
    kwargs_flags,
    make_image_folder,
    make_teacher_checkpoint,
    make_unwritable,
    make_wild_folder,
    make_writable,
    no_training,
    run_args,
    run_selection,
    user_error,
)
from PIL import Image
from torchvision import transforms

import main_finetune
import select_wild_data
from models_pairing import default_probe_blocks
from models_vit import create_vit
from util.errors import UserError
from util.pretrained import read_checkpoint
from util.selection import list_images, training_class_weights, wild_transform


def independent_scores(teacher, images, blocks, prefix=1):
    """Output score and head-0 probe cosine computed from the raw weights, via hooks on norm1."""
    inputs = {}
    hooks = [teacher.blocks[b].norm1.register_forward_hook(lambda m, i, o, b=b: inputs.__setitem__(b, o))
             for b in blocks]
    with torch.no_grad():
        logits = teacher(images)
    for h in hooks:
        h.remove()
    out = F.cross_entropy(logits, logits.argmax(1), reduction='none')
    probes = []
    for b in blocks:
        attn = teacher.blocks[b].attn
        h = inputs[b]
        B, N, C = h.shape
        qkv = (h @ attn.qkv.weight.T + attn.qkv.bias).view(B, N, 3, attn.num_heads, attn.head_dim)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        a = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)
        row = a[:, 0, 0, prefix:]
        probes.append(F.cosine_similarity(row, torch.full_like(row, 1.0 / row.shape[1]), dim=1))
    return out, torch.stack(probes, 1), logits


@pytest.fixture(scope='module')
def setup(workdir):
    """The shared teacher with the args a run of main_finetune.py records, and a wild folder of 24 images."""
    root = workdir.root
    teacher_path = str(root / 'teacher.pth')
    shutil.copy(workdir.teacher, teacher_path)
    ckpt = torch.load(teacher_path)
    ckpt['args'] = {'model': 'vit_base_patch16_224', 'model_kwargs': TINY_ARCH, 'nb_classes': 3, 'input_size': 32,
                    'global_pool': True, 'mode': None}
    torch.save(ckpt, teacher_path)
    wild = make_wild_folder(str(root / 'wild'))
    return root, teacher_path, wild


# ---- selection scores ---------------------------------------------------------------------------------
def test_scores_match_independent_computation(setup):
    root, teacher_path, wild = setup
    selection = run_selection(teacher_path, wild, str(root / 'sel.pth'))
    teacher = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    teacher.load_state_dict(torch.load(teacher_path)['model'])
    teacher.eval()
    paths = list_images(wild)
    assert selection['paths'] == paths and len(paths) == 24
    transform = wild_transform(32, train=False)
    images = torch.stack([transform(Image.open(os.path.join(wild, p)).convert('RGB')) for p in paths])
    blocks = default_probe_blocks(4)[:2]
    out, probe, logits = independent_scores(teacher, images, blocks)
    torch.testing.assert_close(selection['scores']['output'], out, rtol=1e-4, atol=1e-5)
    for i, b in enumerate(blocks):
        torch.testing.assert_close(selection['scores']['probe'][b], probe[:, i], rtol=1e-4, atol=1e-5)
    combined = 0.05 * probe.sum(1) + 0.9 * out
    expected = set(combined.argsort()[:10].tolist())
    assert set(selection['selected'].tolist()) == expected
    soft = logits.softmax(1)[list(expected)].sum(0)
    weights = (1 / soft) / (1 / soft).sum() * 3
    torch.testing.assert_close(selection['soft_sums'], soft, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(selection['class_weights'], weights, rtol=2e-3, atol=1e-3)
    assert torch.equal(selection['predictions'], logits.argmax(1))


def test_output_probe_and_random_rankings(setup):
    root, teacher_path, wild = setup
    full = run_selection(teacher_path, wild, str(root / 'sel_combined.pth'))
    by_output = run_selection(teacher_path, wild, str(root / 'sel_out.pth'), '--score', 'output')
    assert set(by_output['selected'].tolist()) == set(full['scores']['output'].argsort()[:10].tolist())
    probe = sum(full['scores']['probe'].values())
    by_probe = run_selection(teacher_path, wild, str(root / 'sel_probe.pth'), '--score', 'probe')
    assert set(by_probe['selected'].tolist()) == set(probe.argsort()[:10].tolist())
    rand = run_selection(teacher_path, wild, str(root / 'sel_rand.pth'), '--random', '--seed', '3')
    assert len(set(rand['selected'].tolist())) == 10 and rand['ranking'] == 'random'


def test_mean_over_heads_probe(setup):
    root, teacher_path, wild = setup
    sel = run_selection(teacher_path, wild, str(root / 'sel_mean.pth'), '--probe_heads', 'mean',
                        '--probe_blocks', '1')
    teacher = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    teacher.load_state_dict(torch.load(teacher_path)['model'])
    inputs = {}
    teacher.blocks[1].norm1.register_forward_hook(lambda m, i, o: inputs.__setitem__('h', o))
    transform = wild_transform(32, train=False)
    x = torch.stack([transform(Image.open(os.path.join(wild, p)).convert('RGB')) for p in sel['paths']])
    with torch.no_grad():
        teacher.eval()(x)
    attn, h = teacher.blocks[1].attn, inputs['h']
    qkv = (h @ attn.qkv.weight.T + attn.qkv.bias).view(len(x), 17, 3, 3, 16)
    a = (qkv[:, :, 0].transpose(1, 2) @ qkv[:, :, 1].permute(0, 2, 3, 1) / 4.0).softmax(-1)
    rows = a[:, :, 0, 1:]
    cos = F.cosine_similarity(rows, torch.full_like(rows, 1 / 16), dim=-1).mean(1)
    torch.testing.assert_close(sel['scores']['probe'][1], cos, rtol=1e-4, atol=1e-5)


# ---- selection survives interruption --------------------------------------------------------------------
def test_interrupted_selection_resumes_to_the_same_file(setup, monkeypatch):
    root, teacher_path, wild = setup
    reference = run_selection(teacher_path, wild, str(root / 'ref.pth'))
    score_chunk, calls = select_wild_data.score_chunk, [0]

    def crash_on_third_chunk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return score_chunk(*args, **kwargs)

    monkeypatch.setattr(select_wild_data, 'score_chunk', crash_on_third_chunk)
    out = str(root / 'resumed.pth')
    with pytest.raises(KeyboardInterrupt):
        run_selection(teacher_path, wild, out)
    assert sorted(os.listdir(out + '.chunks')) == ['chunk_000000.pth', 'chunk_000001.pth', 'manifest.json']
    monkeypatch.setattr(select_wild_data, 'score_chunk', score_chunk)
    calls[0] = 0
    counting = []
    monkeypatch.setattr(select_wild_data, 'score_chunk', lambda *a, **k: counting.append(1) or score_chunk(*a, **k))
    resumed = run_selection(teacher_path, wild, out)
    assert len(counting) == 2  # only the two chunks left (24 images in chunks of 7)
    saved = read_checkpoint(out)
    for key in ('selected', 'predictions', 'soft_sums', 'class_weights', 'value'):
        assert torch.equal(saved[key], reference[key]), key
    assert torch.equal(resumed['scores']['output'], reference['scores']['output'])
    # a rerun with other settings must not mix its scores with these
    with pytest.raises(UserError, match='scores of another run.*probe_heads'):
        run_selection(teacher_path, wild, out, '--probe_heads', 'mean')


# ---- torchrun: sharded selection, then probe distillation on two ranks ---------------------------------
@pytest.mark.slow
def test_torchrun_selection_shards_and_probe_ranks_agree(setup, workdir, tmp_path):
    root, teacher_path, wild = setup
    single = run_selection(teacher_path, wild, str(tmp_path / 'single.pth'))
    port = str(free_port())
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', port,
           os.path.join(ROOT, 'select_wild_data.py'), '--teacher', teacher_path, '--wild_path', wild, '--output',
           str(tmp_path / 'sharded.pth'), '--num_select', '10', '--chunk_size', '7', '--batch_size', '5',
           '--num_workers', '0', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sharded = read_checkpoint(str(tmp_path / 'sharded.pth'))
    assert torch.equal(sharded['selected'], single['selected'])
    torch.testing.assert_close(sharded['scores']['output'], single['scores']['output'])

    target = workdir.data
    out = str(tmp_path / 'student')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           os.path.join(ROOT, 'tests', 'ddp_worker.py'), '--mode', 'probe', '--finetune', teacher_path,
           '--selection', str(tmp_path / 'sharded.pth'), '--eval_data_path', target, '--nb_classes', '3',
           '--input_size', '32', '--epochs', '1', '--batch_size', '2', '--num_workers', '0', '--device', 'cpu',
           '--dist_eval', '--output_dir', out, '--log_dir', out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(os.path.join(out, f'rank{r}_epoch0.pt')) for r in (0, 1))
    assert all(torch.equal(v, r1[k]) for k, v in r0.items())


# ---- the teacher's pooling ---------------------------------------------------------------------------------
@pytest.mark.parametrize('pool,warns', [('avg', True), ('token', False)])
def test_selection_warns_when_the_teacher_pools_by_average(tmp_path, pool, warns):
    teacher = create_vit('vit_base_patch16_224', num_classes=3, global_pool=pool, img_size=32, **TINY_ARCH)
    path = str(tmp_path / 'teacher.pth')
    torch.save({'model': teacher.state_dict(), 'args': {'model': 'vit_base_patch16_224', 'model_kwargs': TINY_ARCH,
                                                        'nb_classes': 3, 'input_size': 32,
                                                        'global_pool': pool == 'avg'}}, path)
    args = select_wild_data.get_args_parser().parse_args(['--teacher', path, '--wild_path', 'w', '--output', 'o'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        select_wild_data.build_teacher(*select_wild_data.resolve(args))
    assert any('--cls_token' in str(w.message) for w in caught) == warns


# ---- class weights from an augmented pass over the selection (the reference) ---------------------------
def test_class_weights_from_an_augmented_pass(setup, shared_images, tmp_path):
    classes = 3
    _, teacher_path, _ = setup  # the shared teacher with its run's args
    wild = shared_images(classes=classes, train_per_class=6, val_per_class=0, size=40)
    selection_path = str(tmp_path / 'selection.pth')
    select_args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', teacher_path, '--wild_path', wild, '--output', selection_path, '--num_select', '12',
         '--batch_size', '5', '--num_workers', '0', '--device', 'cpu'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        selection = select_wild_data.main(select_args)
        teacher = select_wild_data.build_teacher(*select_wild_data.resolve(select_args))
    weights = training_class_weights(teacher, selection_path, teacher_path, 32, 0.5, 7, 5, 'cpu')

    # independent: torch seeded with 7, each selected image in order through resize 32x32, pad-4 random crop,
    # flip with probability 0.5, ImageNet normalisation; the teacher's softmax summed; inverse, sum = classes
    augment = transforms.Compose([transforms.Resize((32, 32)), transforms.RandomCrop(32, padding=4),
                                  transforms.RandomHorizontalFlip(0.5), transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    torch.manual_seed(7)
    images = [augment(Image.open(os.path.join(selection['root'], selection['paths'][i])).convert('RGB'))
              for i in selection['selected'].tolist()]
    with torch.no_grad():
        sums = teacher(torch.stack(images)).softmax(dim=1).double().sum(dim=0)
    expected = (1.0 / sums) / (1.0 / sums).sum() * classes
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weights, selection['class_weights'], rtol=1e-3)  # not the unaugmented pass's

    # cached beside the selection, reused while nothing changed; another seed recomputes
    cache = selection_path + '.aug_weights.pth'
    assert os.path.exists(cache)
    torch.save({**torch.load(cache), 'class_weights': torch.full((classes,), 5.0)}, cache)
    reused = training_class_weights(teacher, selection_path, teacher_path, 32, 0.5, 7, 5, 'cpu')
    assert torch.equal(reused, torch.full((classes,), 5.0))
    other = training_class_weights(teacher, selection_path, teacher_path, 32, 0.5, 8, 5, 'cpu')
    assert not torch.equal(other, reused) and other.sum().item() == pytest.approx(classes)


def test_a_selection_writes_its_kept_files_as_csv_and_a_contact_sheet(setup):
    import csv

    root, teacher_path, wild = setup
    out = str(root / 'sel_views.pth')
    selection = run_selection(teacher_path, wild, out)
    with open(out + '.csv') as f:
        rows = list(csv.DictReader(f))
    kept = selection['selected'].tolist()
    assert len(rows) == len(kept) == 10
    assert {r['file'] for r in rows} == {selection['paths'][i] for i in kept}
    values = [float(r['value']) for r in rows]
    assert values == sorted(values)  # best-ranked first
    assert max(values) <= min(float(v) for i, v in enumerate(selection['value']) if i not in kept)
    for r in rows:
        i = selection['paths'].index(r['file'])
        assert float(r['value']) == pytest.approx(float(selection['value'][i]), rel=1e-5)
        assert int(r['predicted_class']) == int(selection['predictions'][i])
    with open(out + '.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


# ---- moved from test_bad_input.py: bad flags refused before scoring; a --selection that is not one -----------------
@pytest.mark.parametrize('extra, expected', [
    (['--chunk_size', '0'], '--chunk_size 0: must be >= 1'),
    (['--chunk_size', '-5'], '--chunk_size -5: must be >= 1'),
    (['--batch_size', '0'], '--batch_size 0: must be >= 1'),
    (['--attnlier', 'nan'], '--attnlier nan: must be a finite weight'),
    (['--outlier', 'nan'], '--outlier nan: must be a finite weight'),
    (['--output', '{root}/selections/'], "names a folder, but the selection is one file"),
    (['--output', '{root}/blocker/selection.pth'], "is a file, not a folder"),
    (['--output', '{root}/readonly/selection.pth'], "cannot be written"),
])
def test_select_wild_data_refuses_bad_flags_before_scoring(tmp_path, monkeypatch, extra, expected):
    (tmp_path / 'blocker').write_text('a file where a folder should be')
    extra = [x.format(root=tmp_path) for x in extra]
    if 'readonly' in extra[-1] and not make_unwritable(tmp_path / 'readonly'):
        pytest.skip('cannot make a folder unwritable here')
    monkeypatch.setattr(select_wild_data, 'read_checkpoint', lambda *a, **k: pytest.fail('the teacher was loaded'))
    args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', 'teacher.pth', '--wild_path', str(tmp_path), '--output', str(tmp_path / 'sel.pth'),
         '--device', 'cpu', *extra])
    try:
        with pytest.raises(UserError) as err:
            select_wild_data.main(args)
    finally:
        if 'readonly' in extra[-1]:
            make_writable(tmp_path / 'readonly')
    message = str(err.value)
    assert expected in message, message
    if '--output' in extra:
        assert extra[-1] in message or os.path.dirname(extra[-1]) in message
    if extra[-1].endswith('/'):
        assert f"--output {os.path.join(extra[-1], 'selection.pth')}" in message  # the fix, spelled out


@pytest.fixture(scope='module')
def wild(small_work):
    folder = small_work.root / 'wild'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return str(folder)


@pytest.mark.parametrize('num_select', ['0', '6'])
def test_num_select_checked_before_scoring(small_work, wild, num_select, monkeypatch):
    monkeypatch.setattr(select_wild_data, 'score_chunk', lambda *a, **k: pytest.fail('scoring started'))
    args = select_wild_data.get_args_parser().parse_args([
        '--teacher', small_work.teacher, '--model', 'vit_base_patch16_224', '--model_kwargs',
        *kwargs_flags(TINY_ARCH), '--nb_classes', '3', '--input_size', '32',
        '--wild_path', wild, '--output', str(small_work.root / f'sel{num_select}.pth'), '--num_select', num_select,
        '--num_workers', '0', '--device', 'cpu'])
    with pytest.raises(UserError, match=f'--num_select {num_select}'):
        select_wild_data.main(args)


def test_selection_that_is_not_a_selection_file(small_work):
    path = str(small_work.root / 'not_a_selection.pth')
    torch.save({'something': torch.zeros(2)}, path)
    message = user_error(run_args(small_work, 'bad_sel', '--mode', 'probe', '--finetune', small_work.teacher,
                                  '--selection', path))
    assert '--selection' in message and path in message and 'select_wild_data.py' in message


# ---- moved from test_run_folder.py: a class-weight cache beside a read-only selection, a moved wild folder ---------
@ROOT_ONLY
def test_class_weight_cache_beside_a_read_only_selection_warns_and_goes_on(tmp_path):
    teacher_path = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'))
    ckpt = torch.load(teacher_path)
    ckpt['args'] = {'model': 'vit_base_patch16_224', 'model_kwargs': TINY_ARCH, 'nb_classes': 3, 'input_size': 32,
                    'global_pool': True, 'mode': 'none'}
    torch.save(ckpt, teacher_path)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=3, train_per_class=4, val_per_class=0)
    folder = tmp_path / 'selection'
    folder.mkdir()
    selection = str(folder / 'selection.pth')
    args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', teacher_path, '--wild_path', wild, '--output', selection, '--num_select', '6',
         '--batch_size', '4', '--num_workers', '0', '--device', 'cpu'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        select_wild_data.main(args)
        teacher = select_wild_data.build_teacher(*select_wild_data.resolve(args))
    with immutable(folder), pytest.warns(UserWarning, match='class weights not cached'):
        weights = training_class_weights(teacher, selection, teacher_path, 32, 0.5, 0, 4, 'cpu')
    assert weights.shape == (3,) and weights.sum().item() == pytest.approx(3.0)


def test_a_moved_wild_folder_is_refused_at_start(tmp_path, monkeypatch):
    target = make_image_folder(str(tmp_path / 'target'), classes=3, train_per_class=2, val_per_class=2)
    wild = make_image_folder(str(tmp_path / 'wild'), classes=2, train_per_class=4, val_per_class=0)
    paths = sorted(os.path.relpath(os.path.join(d, f), wild) for d, _, fs in os.walk(wild) for f in fs)
    selection = str(tmp_path / 'selection.pth')
    torch.save({'root': wild, 'paths': paths, 'selected': torch.arange(8), 'nb_classes': 3, 'ranking': 'output'},
               selection)
    teacher = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'))
    argv = ['--mode', 'probe', '--finetune', teacher, '--selection', selection, '--eval_data_path', target,
            '--model', 'vit_base_patch16_224', '--model_kwargs', 'patch_size=8', 'embed_dim=48', 'depth=4',
            'num_heads=3', '--input_size', '32', '--nb_classes', '3', '--batch_size', '8', '--teacher_acc', '0.9',
            '--num_workers', '0', '--device', 'cpu', '--output_dir', str(tmp_path / 'probe'), '--epochs', '1']
    no_training(monkeypatch)
    os.rename(wild, tmp_path / 'wild_moved')
    with pytest.raises(UserError, match=r"--selection .*selection\.pth: its wild image folder .*wild' no longer "
                                        r"exists"):
        main_finetune.run(argv)
    os.rename(tmp_path / 'wild_moved', wild)
    os.remove(os.path.join(wild, paths[3]))
    with pytest.raises(UserError, match=r"1 of 8 kept images checked are missing from its wild image folder"):
        main_finetune.run(argv)
    # one that goes missing during training is reported as missing, not as undecodable
    from util.selection import ImageFiles
    with pytest.warns(UserWarning, match=r"skipping missing image .*: FileNotFoundError"):
        assert ImageFiles(wild, [paths[3]])[0] is None
