"""--init_from_teacher: the named components of a new run's student are the teacher's tensors, every other student
tensor is what the run would have started with without the flag (same seed), the start line names exactly the
tensors copied, and a resumed run, a misfit or a conflicting flag is said in one line."""
import argparse
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, TINY_ARCH, tiny_args

import main_finetune
from models_component_init import COMPONENTS, Part, component_parts
from models_pair import ModelArgumentError
from models_vit import create_vit
from util.args import explicit_flags
from util.errors import UserError
from util.pretrained import read_checkpoint

# helpers.TINY: 4 blocks of width 48, so qkv has 144 rows, q and k the first 96
BLOCKS, WIDTH = range(4), 48
QK, V = (0, 2 * WIDTH), (2 * WIDTH, 3 * WIDTH)
# each component's tensors in the tiny ViT, written out by hand: (name, rows or None)
EXPECTED = {
    'patch_embed': [('patch_embed.proj.weight', None), ('patch_embed.proj.bias', None)],
    'pos_embed': [('pos_embed', None)],
    'cls_token': [('cls_token', None)],
    'norm': [(f'blocks.{i}.norm{n}.{w}', None) for i in BLOCKS for n in (1, 2) for w in ('weight', 'bias')],
    'qk': [(f'blocks.{i}.attn.qkv.{w}', QK) for i in BLOCKS for w in ('weight', 'bias')],
    'v': [(f'blocks.{i}.attn.qkv.{w}', V) for i in BLOCKS for w in ('weight', 'bias')],
    'proj': [(f'blocks.{i}.attn.proj.{w}', None) for i in BLOCKS for w in ('weight', 'bias')],
    'mlp': [(f'blocks.{i}.mlp.fc{n}.{w}', None) for i in BLOCKS for n in (1, 2) for w in ('weight', 'bias')],
}


@pytest.fixture(scope='module')
def work(workdir, tmp_path_factory):
    """The shared data beside a tiny teacher none of whose tensors is at a fresh model's initialisation (norms
    and biases included)."""
    torch.manual_seed(5)
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    with torch.no_grad():
        for value in vit.state_dict().values():
            value.add_(torch.randn_like(value))
    path = tmp_path_factory.mktemp('component_teacher') / 'teacher.pth'
    torch.save({'model': vit.state_dict()}, path)
    return SimpleNamespace(data=workdir.data, teacher=str(path))


def args_for(work, out, *flags, epochs=2):
    return tiny_args(work.data, str(out), '--finetune', work.teacher, *flags, epochs=epochs)


def started_student(work, tmp_path, *flags, mode='distill', seed=0):
    """The student and teacher state dicts of a new run right after their weights are loaded, as main_finetune
    builds them (the student drawn at ``seed``)."""
    argv = args_for(work, tmp_path / 'out', '--mode', mode, *flags)
    parser = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()])
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    run = main_finetune.resolve_args(args)
    torch.manual_seed(seed)
    model = main_finetune.build_model(run)
    main_finetune.load_initial_weights(model, run.mode, run.cfg, None, run.spec.pair_map)
    return ({k: v.clone() for k, v in model.student.state_dict().items()},
            {k: v.clone() for k, v in model.teacher.state_dict().items()})


def rows_of(tensor, rows):
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def check_copied(before: dict, after: dict, teacher: dict, copied: list, sources: dict | None = None) -> None:
    """``after`` holds the teacher's tensors (or rows) ``copied`` and ``before``'s everywhere else; ``sources``:
    the teacher tensor of a student tensor where it is another (a shallower student's blocks)."""
    sources = sources or {}
    for name, rows in copied:
        source = teacher[sources.get(name, name)]
        assert torch.equal(rows_of(after[name], rows), rows_of(source, rows)), f'{name} is not the teacher\'s'
        assert not torch.equal(rows_of(before[name], rows), rows_of(source, rows)), f'{name} was the teacher\'s before'
    copied_rows = {}
    for name, rows in copied:
        copied_rows.setdefault(name, []).append(rows)
    for name, value in before.items():
        keep = torch.ones(value.shape[0], dtype=torch.bool)
        for rows in copied_rows.get(name, []):
            keep[slice(*rows) if rows else slice(None)] = False
        assert torch.equal(after[name][keep], value[keep]), f'{name} changed, but it is not among the copied tensors'


@pytest.mark.parametrize('components', ['norm,qk', 'patch_embed,pos_embed,cls_token', 'v,proj,mlp'])
def test_the_named_components_are_the_teachers_and_the_rest_is_unchanged(work, tmp_path, components):
    before, _ = started_student(work, tmp_path)
    after, teacher = started_student(work, tmp_path, '--init_from_teacher', components)
    check_copied(before, after, teacher, [part for name in components.split(',') for part in EXPECTED[name]])


def test_the_start_line_names_exactly_the_tensors_copied(work, tmp_path, capsys):
    started_student(work, tmp_path, '--init_from_teacher', 'qk,norm')
    line = next(line for line in capsys.readouterr().out.splitlines() if '(--init_from_teacher' in line)
    assert line == ("student (--init_from_teacher qk,norm): 16 tensors and the rows of 8 more copied from the teacher: "
                    "blocks.[0-3].norm1.weight, blocks.[0-3].norm1.bias, blocks.[0-3].norm2.weight, "
                    "blocks.[0-3].norm2.bias, blocks.[0-3].attn.qkv.weight[0:96], blocks.[0-3].attn.qkv.bias[0:96]; "
                    "the other 32 of the student's 56 tensors keep their initialisation")


def test_the_check_finds_one_tensor_too_many_or_too_few(work, tmp_path):
    """check_copied, the judge of the tests above, fails when the copy takes one tensor (or rows) more or less."""
    before, _ = started_student(work, tmp_path)
    after, teacher = started_student(work, tmp_path, '--init_from_teacher', 'norm,qk')
    copied = EXPECTED['norm'] + EXPECTED['qk']
    check_copied(before, after, teacher, copied)
    one_more = {**after, 'blocks.2.mlp.fc1.bias': teacher['blocks.2.mlp.fc1.bias']}
    whole_qkv = {**after, 'blocks.0.attn.qkv.weight': teacher['blocks.0.attn.qkv.weight']}
    one_fewer = {**after, 'blocks.3.norm2.weight': before['blocks.3.norm2.weight']}
    for wrong in (one_more, whole_qkv, one_fewer):
        with pytest.raises(AssertionError):
            check_copied(before, wrong, teacher, copied)
    with pytest.raises(AssertionError):  # the check's own list one entry short
        check_copied(before, after, teacher, copied[1:])


def test_a_shallower_student_takes_the_blocks_it_is_paired_with(work, tmp_path, capsys):
    flags = ('--student_kwargs', 'depth=2')
    before, _ = started_student(work, tmp_path, *flags)
    after, teacher = started_student(work, tmp_path, *flags, '--init_from_teacher', 'mlp')
    copied = [(f'blocks.{i}.mlp.fc{n}.{w}', None) for i in range(2) for n in (1, 2) for w in ('weight', 'bias')]
    paired = (1, 3)  # student block -> teacher block: the default pairing of 2 blocks over 4, top to top
    sources = {name: re.sub(r'^blocks\.(\d)', lambda m: f'blocks.{paired[int(m.group(1))]}', name)
               for name, _ in copied}
    check_copied(before, after, teacher, copied, sources)
    assert '(from teacher blocks 1,3)' in capsys.readouterr().out


@pytest.mark.parametrize('flags,message', [
    (['--init_from_teacher', 'norm,attn'], "--init_from_teacher norm,attn: 'attn': not a component; name one or more "
                                           "of " + ', '.join(COMPONENTS)),
    (['--init_from_teacher', 'norm', '--student_kwargs', 'embed_dim=24'],
     "--init_from_teacher norm: norm: the student's blocks.0.norm1.weight is (24,) and the teacher's "
     "blocks.0.norm1.weight is (48,)"),
    (['--init_from_teacher', 'reg_token'], "--init_from_teacher reg_token: reg_token: the student has no such tensors"),
    (['--init_from_teacher', 'norm', '--student_init', 'TEACHER'], "--init_from_teacher norm with --student_init"),
])
def test_misfits_and_conflicts_are_one_error_line(work, tmp_path, flags, message):
    flags = [work.teacher if f == 'TEACHER' else f for f in flags]
    with pytest.raises(UserError) as e:
        started_student(work, tmp_path, *flags)
    assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_a_mode_without_a_random_student_refuses_it(work, tmp_path):
    with pytest.raises(UserError, match=r"^--init_from_teacher norm: --mode none has no randomly initialised student"):
        main_finetune.run(args_for(work, tmp_path / 'plain', '--init_from_teacher', 'norm'))


def test_the_parts_refuse_a_teacher_of_another_layout():
    student = {'blocks.0.norm1.weight': torch.zeros(4)}
    with pytest.raises(ModelArgumentError, match='the teacher has no blocks.0.norm1.weight'):
        component_parts(student, {'blocks.0.ln_1.weight': torch.zeros(4)}, ['norm'], {0: 0})
    assert component_parts(student, student, ['norm'], {0: 0}) == [Part('norm', 'blocks.0.norm1.weight',
                                                                        'blocks.0.norm1.weight')]


def test_a_resumed_run_does_not_use_it_and_says_so(work, tmp_path, capsys):
    out = tmp_path / 'run'
    main_finetune.run(args_for(work, out, '--mode', 'distill', '--init_from_teacher', 'norm', epochs=1))
    assert read_checkpoint(str(out / 'checkpoint.pth'))['args']['init_from_teacher'] == 'norm'
    shutil.copytree(out, tmp_path / 'more')
    capsys.readouterr()
    main_finetune.run(args_for(work, tmp_path / 'more', '--mode', 'distill', '--resume', 'allow',
                               '--init_from_teacher', 'mlp', epochs=2))
    printed = capsys.readouterr().out
    assert re.search(r"--init_from_teacher mlp is not used when resuming: the student's weights come from \S+"
                     r"checkpoint.pth \(its run started with --init_from_teacher norm\)", printed)
    assert 'resumed with a change: --init_from_teacher' not in printed and '(--init_from_teacher mlp)' not in printed
    assert read_checkpoint(str(tmp_path / 'more' / 'checkpoint.pth'))['args']['init_from_teacher'] == 'norm'


def test_every_component_is_documented_with_its_tensors():
    with open(os.path.join(ROOT, 'docs', 'TRAINING.md'), encoding='utf-8') as f:
        rows = {m.group(1) for m in re.finditer(r'^\s*\| `(\w+)` \| ', f.read(), flags=re.M)}
    assert set(COMPONENTS) <= rows
