"""--eval_classes (a 1000-class model scored on ImageNet-A / -R's 200 classes) and tools/eval_shift.py (the four
distribution-shift sets in one table), against timm's ImageNet metadata and a classifier whose answers are known."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import TINY_ARCH, kwargs_flags, tiny_args
from PIL import Image
from timm.data import ImageNetInfo

import main_finetune
from models_vit import create_vit
from tools import eval_shift
from util.errors import UserError
from util.eval_classes import ClassSubset, check_class_folders, read_eval_classes, subset_file

SYNSETS = ImageNetInfo('imagenet-1k').label_names()


@pytest.mark.parametrize('name,stem', [('imagenet-a', 'imagenet_a'), ('imagenet-r', 'imagenet_r')])
def test_named_subsets_pick_the_classes_of_timms_metadata(name, stem):
    subset = read_eval_classes(name, 1000)
    assert len(subset.indices) == 200 and len(set(subset.indices)) == 200
    # the logits picked are those of the subset's WordNet ids in ImageNet-1k's order (timm's public class list)
    assert [SYNSETS[i] for i in subset.indices] == list(subset.synsets)
    assert sorted(subset.synsets) == sorted(subset_file(stem, 'synsets')) == list(subset.synsets)
    assert sorted(subset.indices) == [int(i) for i in subset_file(stem, 'indices')]


def test_a_file_of_wordnet_ids_or_indices(tmp_path):
    (tmp_path / 'wnids.txt').write_text(f"{SYNSETS[5]}\n{SYNSETS[2]}\n")
    assert read_eval_classes(str(tmp_path / 'wnids.txt'), 1000).indices == (5, 2)
    (tmp_path / 'indices.txt').write_text("7\n3\n")
    assert read_eval_classes(str(tmp_path / 'indices.txt'), 10).indices == (7, 3)
    with pytest.raises(UserError, match='outside'):
        read_eval_classes(str(tmp_path / 'indices.txt'), 5)
    (tmp_path / 'bad.txt').write_text("n0000\n")
    with pytest.raises(UserError, match='neither ImageNet-1k WordNet ids'):
        read_eval_classes(str(tmp_path / 'bad.txt'), 1000)
    with pytest.raises(UserError, match='--eval_classes'):
        read_eval_classes('imagenet-x', 1000)


def test_a_class_named_twice_is_refused(tmp_path):
    """Two lines naming one class would score two class folders by one logit."""
    (tmp_path / 'indices.txt').write_text("7\n7\n9\n")
    with pytest.raises(UserError, match=r"--eval_classes .*indices.txt: 7 is named twice \(lines 1 and 2\)"):
        read_eval_classes(str(tmp_path / 'indices.txt'), 10)
    (tmp_path / 'wnids.txt').write_text(f"{SYNSETS[5]}\n{SYNSETS[2]}\n{SYNSETS[5]}\n")
    with pytest.raises(UserError, match=f"{SYNSETS[5]} is named twice \\(lines 1 and 3\\)"):
        read_eval_classes(str(tmp_path / 'wnids.txt'), 1000)


def test_a_file_saved_with_a_byte_order_mark(tmp_path):
    (tmp_path / 'wnids.txt').write_text(f"{SYNSETS[5]}\n{SYNSETS[2]}\n", encoding='utf-8-sig')
    assert read_eval_classes(str(tmp_path / 'wnids.txt'), 1000).indices == (5, 2)
    (tmp_path / 'indices.txt').write_text("7\n3\n", encoding='utf-8-sig')
    assert read_eval_classes(str(tmp_path / 'indices.txt'), 10).indices == (7, 3)


def test_wordnet_ids_in_another_order_than_the_folders_are_refused_naming_the_order(tmp_path):
    """Line k of the file scores the k-th sorted class folder: the same classes in another order would score
    each folder by another class's logit."""
    (tmp_path / 'wnids.txt').write_text(f"{SYNSETS[5]}\n{SYNSETS[2]}\n")
    subset = read_eval_classes(str(tmp_path / 'wnids.txt'), 1000)
    folders = sorted([SYNSETS[5], SYNSETS[2]])
    with pytest.raises(UserError) as refused:
        check_class_folders(folders, subset, str(tmp_path / 'wnids.txt'), 'val')
    message = str(refused.value)
    assert 'missing []' not in message and 'another order' in message
    assert f"line 1 names {SYNSETS[5]}, but sorted class folder 1 is {SYNSETS[2]}" in message
    assert 'sort the lines' in message
    check_class_folders(folders, ClassSubset((2, 5), tuple(folders)), 'f', 'val')  # in the folders' order: accepted


# ---- the tool, end to end, with a classifier whose answers are known ---------------------------------
TOP = 5  # the class the classifier prefers over all others: in neither ImageNet-A nor -R, and not the 6th folder
# of ImageNetV2's in string order ('0', '1', '10', '100', ...)


def constant_classifier(path):
    """A tiny 1000-class ViT that ignores its input: its logits are the head's bias, highest for TOP, then the
    last 10 classes of ImageNet-A and -R (in the sorted subsets), the last highest."""
    torch.manual_seed(0)
    vit = create_vit('vit_base_patch16_224', num_classes=1000, img_size=32, **TINY_ARCH)
    bias = torch.zeros(1000)
    for name in ('imagenet-a', 'imagenet-r'):
        for rank, i in enumerate(read_eval_classes(name, 1000).indices[:10]):
            bias[i] = max(bias[i].item(), 100.0 - rank)
    assert TOP not in read_eval_classes('imagenet-a', 1000).indices + read_eval_classes('imagenet-r', 1000).indices
    bias[TOP] = 1000.0
    with torch.no_grad():
        vit.head.weight.zero_()
        vit.head.bias.copy_(bias)
    torch.save({'model': vit.state_dict()}, path)
    return bias


def fake_set(root, folders, favoured):
    """One image per class folder, three in the ``favoured`` one."""
    rng = np.random.default_rng(0)
    image = root.parent / f'{root.name}.png'
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    for name in folders:
        os.makedirs(root / name)
        for k in range(3 if name == favoured else 1):
            shutil.copyfile(image, root / name / f'{k}.png')
    return str(root)


@pytest.mark.slow
def test_eval_shift_scores_each_set_on_its_classes(tmp_path):
    bias = constant_classifier(tmp_path / 'classifier.pth')
    a = read_eval_classes('imagenet-a', 1000)
    r = read_eval_classes('imagenet-r', 1000)
    # by hand: the prediction among a subset's classes is the one of highest bias, whose folder holds 3 images
    best_a = a.synsets[int(torch.argmax(bias[list(a.indices)]))]
    best_r = r.synsets[int(torch.argmax(bias[list(r.indices)]))]
    sets = {
        'imagenet_a': fake_set(tmp_path / 'a', a.synsets, best_a),
        'imagenet_r': fake_set(tmp_path / 'r', r.synsets, best_r),
        'imagenet_sketch': fake_set(tmp_path / 'sketch', SYNSETS, SYNSETS[TOP]),
        'imagenet_v2': fake_set(tmp_path / 'v2', [str(i) for i in range(1000)], str(TOP)),  # folders by index
    }
    out = tmp_path / 'shift'
    rows = eval_shift.main([*[x for flag, root in sets.items() for x in (f'--{flag}', root)], '--output_dir', str(out),
                            '--finetune', str(tmp_path / 'classifier.pth'), '--model', 'vit_base_patch16_224',
                            '--model_kwargs', *kwargs_flags(TINY_ARCH), '--input_size', '32', '--device', 'cpu',
                            '--num_workers', '0', '--batch_size', '128'])
    got = {row['set']: row for row in rows}
    assert got['ImageNet-A']['images'] == got['ImageNet-R']['images'] == 202
    assert got['ImageNet-A']['acc1'] == pytest.approx(100 * 3 / 202)
    assert got['ImageNet-R']['acc1'] == pytest.approx(100 * 3 / 202)
    assert got['ImageNet-A']['acc5'] == pytest.approx(100 * 7 / 202)
    for name in ('ImageNet-Sketch', 'ImageNetV2'):  # all 1000 classes; V2's numbered folders in ImageNet's order
        assert got[name]['images'] == 1002 and got[name]['acc1'] == pytest.approx(100 * 3 / 1002)
    table = json.loads((out / 'shift_results.json').read_text())
    assert [row['set'] for row in table['results']] == ['ImageNet-A', 'ImageNet-R', 'ImageNet-Sketch', 'ImageNetV2']
    assert json.loads((out / 'imagenet_a' / 'eval_results.json').read_text())['test_acc1'] == got['ImageNet-A']['acc1']
    assert '| ImageNet-A | 202 |' in (out / 'shift_results.md').read_text()



def test_eval_classes_refusals(tmp_path, shared_images):
    data = shared_images()
    base = ['--data_path', data, '--output_dir', str(tmp_path / 'out'), '--device', 'cpu', '--num_workers', '0',
            '--model', 'vit_base_patch16_224', '--model_kwargs', *kwargs_flags(TINY_ARCH), '--input_size', '32']
    with pytest.raises(UserError, match='--eval_classes.*add --eval'):
        main_finetune.run([*base, '--eval_classes', 'imagenet-a', '--nb_classes', '3'])
    torch.manual_seed(0)
    torch.save({'model': create_vit('vit_base_patch16_224', num_classes=1000, img_size=32,
                                    **TINY_ARCH).state_dict()}, tmp_path / 'c.pth')
    # a folder of 3 classes is not ImageNet-A's 200
    with pytest.raises(UserError, match='3 class folders.*--eval_classes'):
        main_finetune.run([*base, '--eval', '--finetune', str(tmp_path / 'c.pth'), '--eval_classes', 'imagenet-a'])
    with pytest.raises(UserError, match='--imagenet_a.*not a folder'):
        eval_shift.main(['--imagenet_a', str(tmp_path / 'none'), '--output_dir', str(tmp_path), '--resume', 'x'])
    with pytest.raises(UserError, match='--resume CKPT'):
        eval_shift.main(['--imagenet_a', data, '--output_dir', str(tmp_path)])


def tool_flags(tmp_path, *extra):
    return ['--output_dir', str(tmp_path / 'shift'), '--model', 'vit_base_patch16_224', '--model_kwargs',
            *kwargs_flags(TINY_ARCH), '--input_size', '32', '--device', 'cpu', '--num_workers', '0', *extra]


def test_a_classifier_of_other_classes_is_refused_with_advice_that_can_work(tmp_path, shared_images, capsys):
    """The class count of a --resume checkpoint is its own (no flag changes it), and the sets are ImageNet-1k's
    classes: the advice is another checkpoint, not --nb_classes."""
    run = str(tmp_path / 'run')
    main_finetune.run(tiny_args(shared_images(), run, epochs=1))  # a 3-class classifier
    sketch = fake_set(tmp_path / 'sketch', SYNSETS, SYNSETS[0])
    with pytest.raises(UserError) as refused:
        eval_shift.main(['--imagenet_sketch', sketch, *tool_flags(tmp_path, '--resume', f'{run}/checkpoint.pth')])
    message = str(refused.value)
    assert '--nb_classes' not in message
    assert message.startswith(f"--resume {run}/checkpoint.pth: a classifier of 3 classes, but the shift sets are "
                              "scored by an ImageNet-1k classifier's 1000 classes")
    with pytest.raises(UserError, match=r"^--nb_classes 3: .*1000 classes.*leave --nb_classes out"):
        eval_shift.main(['--imagenet_sketch', sketch, *tool_flags(tmp_path, '--finetune', f'{run}/checkpoint.pth',
                                                                  '--nb_classes', '3')])
    assert not (tmp_path / 'shift' / 'imagenet_sketch' / 'eval_results.json').exists()


def test_every_set_is_checked_before_any_is_evaluated(tmp_path, monkeypatch):
    a = read_eval_classes('imagenet-a', 1000)
    r = read_eval_classes('imagenet-r', 1000)
    valid = fake_set(tmp_path / 'a', a.synsets, a.synsets[0])
    monkeypatch.setattr(eval_shift.main_finetune, 'run', lambda *a, **k: pytest.fail('a set was evaluated'))
    (tmp_path / 'shift').mkdir()
    (tmp_path / 'shift' / 'shift_results.md').write_text('an earlier table')
    broken = {'names': fake_set(tmp_path / 'r1', ['cats', 'dogs'], 'cats'),
              'classes': fake_set(tmp_path / 'r2', r.synsets[1:], r.synsets[1])}
    expected = {'names': r"--imagenet_r .*r1.*: the class folder 'cats' is neither",
                'classes': rf"--imagenet_r .*r2.*: 199 class folders, but ImageNet-R has 200 .*missing "
                           rf"\['{r.synsets[0]}'\]"}
    for kind, root in broken.items():
        with pytest.raises(UserError, match=expected[kind]):
            eval_shift.main(['--imagenet_a', valid, '--imagenet_r', root, *tool_flags(tmp_path, '--finetune', 'c.pth')])
    assert (tmp_path / 'shift' / 'shift_results.md').read_text() == 'an earlier table'
    assert sorted(os.listdir(tmp_path / 'shift')) == ['shift_results.md']  # nothing linked before the refusal
