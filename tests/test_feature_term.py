"""The feature term beside the attention term (--feature_weight, --feature_layer; HASTE's holistic alignment):
its value and gradient against a hand computation in float64, its weight and schedule in the criterion, and a
short run that trains it, keeps the projector in its checkpoints, resumes it bit for bit and refuses what cannot
use it."""
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARCH, args_for, read_log

import main_finetune
from models_dual_vit import build_dual_vit
from models_pair import ModelArgumentError
from util.errors import UserError
from util.losses import TransferCriterion
from util.pretrained import read_checkpoint

ARCH = {**TINY_ARCH, 'depth': 4}


def tiny_pair(feature_layer=1, mode='distill', dtype=torch.float64):
    torch.manual_seed(0)
    pair = build_dual_vit('vit_base_patch16_224', mode=mode, num_classes=3, img_size=32, teacher_kwargs=ARCH,
                          attention_impl='explicit', device='cpu', feature_layer=feature_layer)
    return pair.to(dtype).train()


def residual_stream(vit, x, block):
    """The tokens after ``block``, by timm's own forward_intermediates (not the pair's interleaved loop)."""
    out = vit.forward_intermediates(x, indices=[block], return_prefix_tokens=True, output_fmt='NLC',
                                    intermediates_only=True, output_dict=True)
    return torch.cat([out['image_intermediates_prefix'][0], out['image_intermediates'][0]], dim=1)


def hand_feature_loss(pair, x, layer):
    """1 - cos(P(s_i), t_j) averaged over images and patches, written out: P = fc2(silu(fc1(s))), cos = s.t / |s||t|."""
    s = residual_stream(pair.student, x, layer)[:, pair.student.num_prefix_tokens:]
    t = residual_stream(pair.teacher, x, pair.pairs[layer])[:, pair.teacher.num_prefix_tokens:].detach()
    p = pair.feature_projector
    h = s @ p.fc1.weight.T + p.fc1.bias
    z = (h * torch.sigmoid(h)) @ p.fc2.weight.T + p.fc2.bias
    cos = (z * t).sum(-1) / (z.pow(2).sum(-1).sqrt() * t.pow(2).sum(-1).sqrt())
    return (1 - cos).mean()


def grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize('layer', [0, 2])
def test_the_feature_term_equals_its_formula_value_and_gradient(layer):
    pair = tiny_pair(layer)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    logits, attention, features = pair(x)
    expected = hand_feature_loss(pair, x, layer)
    assert features.dtype == torch.float64
    torch.testing.assert_close(features, expected, rtol=1e-10, atol=0)
    params = [*pair.feature_projector.parameters(), pair.student.blocks[0].attn.qkv.weight]
    got = grads(features, params)
    for g, want in zip(got, grads(expected, params)):
        torch.testing.assert_close(g, want, rtol=1e-8, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in got)
    # the attention term is the one the pair returns without a feature term, and the teacher gets no gradient
    pair_without = tiny_pair(None)
    pair_without.student.load_state_dict(pair.student.state_dict())
    torch.testing.assert_close(pair_without(x)[1], attention, rtol=0, atol=0)
    assert not any(p.requires_grad for p in pair.teacher.parameters())


def test_the_feature_term_vanishes_at_alignment():
    """Where the projected student tokens are the teacher's (a projector that maps them there), the term is 0."""
    pair = tiny_pair(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pair.feature_projector = torch.nn.Module()
    teacher_tokens = residual_stream(pair.teacher, x, pair.pairs[1])
    pair.feature_projector.forward = lambda s: 2.5 * teacher_tokens[:, pair.student.num_prefix_tokens:]
    assert abs(pair(x)[2].item()) < 1e-12


def test_the_criterion_weighs_each_term_and_ends_both_with_transfer_until():
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    attention, features = torch.tensor(0.7), torch.tensor(0.2)
    task = F.cross_entropy(logits, targets)
    criterion = TransferCriterion(torch.nn.CrossEntropyLoss(), atd_weight=3.0, until=2.0, feature_weight=0.5)
    loss, terms = criterion((logits, attention, features), targets)
    torch.testing.assert_close(loss, task + 3.0 * 0.7 + 0.5 * 0.2)
    assert terms['loss_feature_align'] == features and terms['loss_atd'] == attention
    criterion.set_progress(2.0)
    torch.testing.assert_close(criterion((logits, attention, features), targets)[0], task)
    # a model without the term: the criterion's sum is unchanged
    loss, terms = TransferCriterion(torch.nn.CrossEntropyLoss(), 3.0, feature_weight=0.5)((logits, attention), targets)
    torch.testing.assert_close(loss, task + 3.0 * 0.7)
    assert 'loss_feature_align' not in terms


def test_the_pair_refuses_a_feature_layer_it_cannot_use():
    with pytest.raises(ModelArgumentError, match=r"feature layer 3: not one of the transferred layers \[0, 1, 2\]"):
        torch.manual_seed(0)
        build_dual_vit('vit_base_patch16_224', mode='distill', num_classes=3, img_size=32, teacher_kwargs=ARCH,
                       attention_impl='explicit', device='cpu', end_layer=-1, feature_layer=3)
    with pytest.raises(ModelArgumentError, match="a feature term needs a mode with a transfer loss"):
        tiny_pair(1, mode='copy')


# ---- the command line ----------------------------------------------------------------------------------------
FLAGS = ('--mode', 'distill', '--feature_weight', '0.5', '--print_freq', '1')


@pytest.fixture(scope='module')
def feature_run(workdir):
    out = str(workdir.root / 'feature_term')
    stats = main_finetune.run(args_for(workdir, out, *FLAGS, '--save_every', '1'))
    return out, stats


def test_a_short_run_trains_the_term_and_keeps_its_projector(feature_run, capsys):
    out, stats = feature_run
    assert stats['train_loss_feature_align'] > 0 and stats['train_loss_atd'] > 0
    with open(os.path.join(out, 'console.txt')) as f:
        said = f.read()
    assert ("feature term: the student's tokens after layer 2, projected 48 -> 48 wide (0.02M parameters, trained "
            "and not part of the student), against the teacher's after block 2, weight --feature_weight 0.5") in said
    first, last = read_log(out)[0], read_log(out)[-1]
    assert 'train_loss_feature_align' in first and 'train_loss_feature_align' in last
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    spec = ckpt['args']['model_spec']
    assert spec['feature_layer'] == spec['layers'][len(spec['layers']) // 2]
    assert ckpt['args']['feature_weight'] == 0.5
    start = read_checkpoint(os.path.join(out, 'checkpoint-0.pth'))['feature_projector']
    trained = ckpt['feature_projector']
    assert set(trained) == {'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'}
    assert not torch.equal(start['fc1.weight'], trained['fc1.weight'])  # the optimizer trains the projector
    assert not any(k.startswith('feature_projector') for k in ckpt['model'])  # the student alone is the model


def test_resume_continues_the_projector_bit_for_bit(feature_run, workdir):
    full, _ = feature_run
    part = str(workdir.root / 'feature_term_resumed')
    main_finetune.run(args_for(workdir, part, *FLAGS, '--resume', os.path.join(full, 'checkpoint-0.pth')))
    a, b = (read_checkpoint(os.path.join(d, 'checkpoint.pth')) for d in (full, part))
    for key in ('model', 'feature_projector'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'
    assert read_log(part)[-1] == read_log(full)[-1]


def test_resuming_without_the_term_is_refused(feature_run, workdir):
    full, _ = feature_run
    argv = args_for(workdir, str(workdir.root / 'feature_term_off'), '--mode', 'distill', '--resume',
                    os.path.join(full, 'checkpoint-0.pth'))
    with pytest.raises(UserError, match=r"feature_layer: \d -> None"):
        main_finetune.run(argv)


@pytest.mark.parametrize('extra,message', [
    (('--mode', 'copy', '--feature_weight', '1'), r"^--feature_weight 1.0: --mode copy has no transfer loss beside"),
    (('--mode', 'feature_kd', '--feature_weight', '1'), r"^--feature_weight 1.0: --mode feature_kd transfers no "),
    (('--mode', 'none', '--feature_weight', '1'), r"^--feature_weight 1.0: --mode none has no teacher"),
    (('--mode', 'distill', '--feature_layer', '1'), r"^--feature_layer 1: the feature term is off without "),
    (('--mode', 'distill', '--feature_weight', '-1'), r"^--feature_weight -1: must be a finite number >= 0"),
    (('--mode', 'distill', '--feature_weight', '1', '--end_layer', '-2', '--feature_layer', '2'),
     r"^--feature_layer 2: not a transferred layer \(the transferred layers are 0, 1\)"),
])
def test_flags_that_cannot_be_used_are_refused_before_any_folder(workdir, tmp_path, extra, message):
    out = tmp_path / 'refused'
    with pytest.raises(UserError, match=message):
        main_finetune.run(args_for(workdir, str(out), *extra))
    assert not out.exists()
