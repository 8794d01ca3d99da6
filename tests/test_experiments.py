"""The paper's ablations and baselines: --transfer_heads, --map_average, --transfer_until, --mode feature_kd and
logit_kd, checked against attention and losses written out by hand from the timm modules' weights."""
import argparse
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARCH, args_for, kwargs_flags, pair_of, read_log, run_until_stopped

import main_finetune
import modes
from engine_finetune import fix_evaluation_maps
from models_dual_vit import build_dual_vit, forward_dual_with_capture
from models_pair import ModelArgumentError
from models_vit import create_vit
from util.args import explicit_flags
from util.config import Config
from util.errors import UserError
from util.losses import TransferCriterion
from util.pretrained import read_checkpoint

# a tiny ViT with 4 heads (head_dim 12), 3 blocks
ARCH = dict(patch_size=8, embed_dim=48, depth=3, num_heads=4)


def pair(mode, impl, **kwargs):
    torch.manual_seed(0)
    model = build_dual_vit('vit_base_patch16_224', mode=mode, num_classes=5, img_size=32, attention_impl=impl,
                           teacher_kwargs=ARCH, **kwargs)
    with torch.no_grad():  # maps far from uniform, and different in each head
        for vit, sharpen in ((model.teacher, 30.0), (model.student, 20.0)):
            for blk in vit.blocks:
                blk.attn.qkv.weight[:96].mul_(sharpen)
    return model


def qkv(attn, h):
    """q, k, v (B, H, N, d) of a timm Attention from its qkv weights (no qk-norm in these models)."""
    B, N, C = h.shape
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def probs(attn, h):
    q, k, _ = qkv(attn, h)
    return ((q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5).softmax(-1)


def logits(attn, h):
    q, k, _ = qkv(attn, h)
    return (q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5


def attend(attn, h, maps):
    """The attention module's output with the given maps (B, H, N, N) applied to its own v."""
    B, N, C = h.shape
    _, _, v = qkv(attn, h)
    return attn.proj((maps @ v).transpose(1, 2).reshape(B, N, C))


def tokens(vit, x):
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))


def by_hand(model, x, heads, average='none', given=None):
    """Student logits and summed distillation loss of a copy / distill pair, written out: in each layer the student
    uses (copy) or is compared with (distill) the teacher's maps in ``heads``, its own elsewhere (``given``: per
    layer, the (H, N, N) map to use instead of the teacher's for every image)."""
    t, s = model.teacher, model.student
    tx, sx, loss = tokens(t, x), tokens(s, x), 0.0
    copy, maps_so_far = model.mode.use == 'replace', []
    for t_blk, s_blk in zip(t.blocks, s.blocks):
        t_map = probs(t_blk.attn, t_blk.norm1(tx))
        if average == 'examples':
            t_map = t_map.mean(0, keepdim=True).expand_as(t_map)
        elif average == 'queries':
            t_map = t_map.mean(2, keepdim=True).expand_as(t_map)
        if given is not None:
            t_map = given[len(maps_so_far)].expand_as(t_map)
        maps_so_far.append(t_map)
        tx = t_blk(tx)
        h = s_blk.norm1(sx)
        own = probs(s_blk.attn, h)
        maps = own.clone()
        if copy:
            maps[:, heads] = t_map[:, heads]
        else:
            ce = -(t_map[:, heads] * logits(s_blk.attn, h)[:, heads].log_softmax(-1)).sum(-1)
            loss = loss + ce.mean()
        sx = sx + attend(s_blk.attn, h, maps)
        sx = sx + s_blk.mlp(s_blk.norm2(sx))
    return s.forward_head(s.norm(sx)), loss


@pytest.mark.parametrize('impl', ['explicit', 'fused'])
@pytest.mark.parametrize('spec,heads', [('2', [0, 1]), ('1,3', [1, 3])])
def test_copy_transfers_only_the_chosen_heads(impl, spec, heads):
    model = pair('copy', impl, transfer_heads=spec).eval()
    x = torch.randn(3, 3, 32, 32)
    expected, _ = by_hand(model, x, heads)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-4)
        # all heads transferred: another answer (the untransferred heads matter)
        assert not torch.allclose(by_hand(model, x, [0, 1, 2, 3])[0], expected, atol=1e-3)


def test_copy_maps_of_untransferred_heads_are_the_students_own():
    model = pair('copy', 'explicit', transfer_heads='2').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, t_maps, s_maps = forward_dual_with_capture(model, x, [0])
        blk = model.student.blocks[0]
        own = probs(blk.attn, blk.norm1(tokens(model.student, x)))
    assert torch.allclose(s_maps[0][:, :2], t_maps[0][:, :2], atol=1e-6)
    assert torch.allclose(s_maps[0][:, 2:], own[:, 2:], atol=1e-5)
    assert not torch.allclose(s_maps[0][:, 2:], t_maps[0][:, 2:], atol=1e-3)


@pytest.mark.parametrize('impl', ['explicit', 'fused'])
def test_distill_loss_is_that_of_the_transferred_heads(impl):
    model = pair('distill', impl, transfer_heads='1,3').train()
    x = torch.randn(3, 3, 32, 32)
    out, loss = model(x)
    expected_logits, expected = by_hand(model, x, [1, 3])
    assert torch.allclose(out, expected_logits, atol=1e-5, rtol=1e-4)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert not torch.allclose(loss, by_hand(model, x, [0, 2])[1], rtol=1e-2)
    # in the last block, the untransferred heads' q get no gradient from the loss (no later layer uses them)
    grad = torch.autograd.grad(loss, model.student.blocks[-1].attn.qkv.weight)[0]
    q_rows = grad[:48].reshape(4, 12, 48)
    assert q_rows[[0, 2]].abs().max() == 0 and q_rows[[1, 3]].abs().max() > 0


@pytest.mark.parametrize('mode', ['copy', 'distill'])
@pytest.mark.parametrize('average', ['examples', 'queries'])
def test_map_average_hands_over_the_mean_map(mode, average):
    model = pair(mode, 'explicit', map_average=average).train()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    expected_logits, expected_loss = by_hand(model, x, [0, 1, 2, 3], average)
    if mode == 'copy':
        assert torch.allclose(out, expected_logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(out, by_hand(model, x, [0, 1, 2, 3])[0], atol=1e-3)
    else:
        assert torch.allclose(out[1], expected_loss, rtol=1e-5)
        assert not torch.allclose(out[1], by_hand(model, x, [0, 1, 2, 3])[1], rtol=1e-4)


def teacher_maps(model, x):
    """Per block, the teacher's attention probabilities (B, H, N, N), written out from its weights."""
    tx, maps = tokens(model.teacher, x), []
    for blk in model.teacher.blocks:
        maps.append(probs(blk.attn, blk.norm1(tx)))
        tx = blk(tx)
    return maps


def batches_of(x, size):
    return [(x[lo:lo + size], torch.zeros(len(x[lo:lo + size]), dtype=torch.long), 0) for lo in range(0, len(x), size)]


def test_map_average_examples_evaluates_with_the_mean_over_the_evaluation_set():
    """Evaluated, a copy student trained with the teacher's maps averaged over each batch attends with their mean
    over the whole evaluation set: the same logits whatever the batch, those of a hand computation with that mean,
    shared with the EMA student's pair."""
    model = pair('copy', 'explicit', map_average='examples').eval()
    x = torch.randn(6, 3, 32, 32)
    with pytest.raises(ValueError, match='evaluation_maps'):
        model(x)
    loader = batches_of(x, 4)  # a batch of 4 and one of 2
    fix_evaluation_maps(loader, [model], torch.device('cpu'), contextlib.nullcontext())
    means = [m.mean(0) for m in teacher_maps(model, x)]
    expected, _ = by_hand(model, x, [0, 1, 2, 3], given=means)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-4)
        one_at_a_time = torch.cat([model(x[b:b + 1]) for b in range(6)])
        assert torch.allclose(one_at_a_time, expected, atol=1e-5, rtol=1e-4)
        # the mean over one batch of 4 alone is another answer: the whole set's mean is what is used
        batch_mean, _ = by_hand(model, x, [0, 1, 2, 3], given=[m[:4].mean(0) for m in teacher_maps(model, x)])
        assert not torch.allclose(batch_mean, expected, atol=1e-3)
        assert model.with_student(model.student).evaluation_maps is model.evaluation_maps
    assert model.evaluation_maps.images == 6 and model.evaluation_maps.source is loader
    for layer, mean in enumerate(means):
        assert torch.allclose(model.evaluation_maps.maps[layer], mean, atol=1e-6)
    # kept for later evaluations on the same loader, computed again for another
    kept = model.evaluation_maps
    fix_evaluation_maps(loader, [model], torch.device('cpu'), contextlib.nullcontext())
    assert model.evaluation_maps is kept
    fix_evaluation_maps(batches_of(x[:3], 3), [model], torch.device('cpu'), contextlib.nullcontext())
    assert model.evaluation_maps.images == 3


def test_map_average_examples_copies_the_batch_mean_to_every_image():
    model = pair('copy', 'explicit', map_average='examples').train()
    x = torch.randn(4, 3, 32, 32)
    _, t_maps, s_maps = forward_dual_with_capture(model, x, [0, 1, 2])
    for i in range(3):
        mean = t_maps[i].mean(0)
        for b in range(4):
            assert torch.allclose(s_maps[i][b], mean, atol=1e-6)


def test_map_average_refuses_the_fused_attention_and_other_modes():
    with pytest.raises(ModelArgumentError, match='explicit maps'):
        pair('copy', 'fused', map_average='examples')
    with pytest.raises(ModelArgumentError, match='copy_q'):
        pair('copy_q', 'explicit', map_average='queries')
    model = pair('copy', 'auto', map_average='examples').train()  # auto: explicit maps on any device
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), by_hand(model, x, [0, 1, 2, 3], 'examples')[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('spec', ['0', '5', '2-1', 'x'])
def test_transfer_heads_refuses_heads_the_layers_lack(spec):
    with pytest.raises(ModelArgumentError) as refused:
        pair('copy', 'explicit', transfer_heads=spec)
    assert refused.value.argument == 'transfer_heads'
    with pytest.raises(UserError, match='^--transfer_heads: '):
        pair_of('copy', '--transfer_heads', spec, arch=ARCH)


def test_fused_and_explicit_agree_with_some_heads():
    x = torch.randn(2, 3, 32, 32)
    for mode in ('copy', 'distill', 'copy_q', 'copy_v', 'distill_k'):
        outs = []
        for impl in ('explicit', 'fused'):
            model = pair(mode, impl, transfer_heads='0,2').train()
            outs.append(model(x))
        a, b = outs
        if isinstance(a, tuple):
            assert torch.allclose(a[1], b[1], rtol=1e-4), mode
            a, b = a[0], b[0]
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), mode
        assert F.mse_loss(a, b) < 1e-10


# ---- --transfer_until ---------------------------------------------------------------------------------
def distill_step_grads(criterion, model, x, y, epoch):
    criterion.set_progress(epoch)
    model.zero_grad()
    loss, terms = criterion(model(x), y)
    loss.backward()
    return loss, terms, {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('decay', ['step', 'linear'])
def test_transfer_until_leaves_the_task_loss_and_its_gradient_alone(decay):
    model = pair('distill', 'explicit').train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])
    criterion = TransferCriterion(torch.nn.CrossEntropyLoss(), 3.0, until=2.0, decay=decay)
    task_only = TransferCriterion(torch.nn.CrossEntropyLoss(), 0.0)
    for epoch in (2.0, 2.5, 7.0):  # from the epoch on: the task loss alone, and its gradient
        loss, terms, grads = distill_step_grads(criterion, model, x, y, epoch)
        expected, _, expected_grads = distill_step_grads(task_only, model, x, y, epoch)
        assert terms['atd_weight'] == 0 and terms['loss_atd'] > 0
        assert torch.equal(loss, expected)
        for name, grad in grads.items():
            assert torch.equal(grad, expected_grads[name]), name
    # before it: the full weight (step) or the linearly decayed one, in the loss and its gradient
    for epoch, weight in ((0.0, 3.0), (0.5, 3.0 if decay == 'step' else 2.25), (1.99, 3.0 if decay == 'step' else
                                                                                 3.0 * (1 - 1.99 / 2))):
        loss, terms, _ = distill_step_grads(criterion, model, x, y, epoch)
        assert terms['atd_weight'] == pytest.approx(weight)
        assert torch.allclose(loss, terms['loss_task'] + weight * terms['loss_atd'], rtol=1e-6)
        assert terms['loss_atd'] > 0.1


@pytest.mark.slow
def test_transfer_until_in_a_run(workdir):
    out = str(workdir.root / 'until')
    main_finetune.run(args_for(workdir, out, '--mode', 'distill', '--transfer_until', '1', epochs=2))
    log = read_log(out)
    assert [e['train_atd_weight'] for e in log] == [3.0, 0.0]
    assert log[1]['train_loss'] == pytest.approx(log[1]['train_loss_task'], rel=1e-6)


def test_transfer_until_refused_without_a_transfer_loss(workdir):
    for mode in ('copy', 'none'):
        with pytest.raises(UserError, match='--transfer_until'):
            main_finetune.run(args_for(workdir, str(workdir.root / 'refused'), '--mode', mode, '--transfer_until',
                                       '1'))


# ---- --mode feature_kd / logit_kd ---------------------------------------------------------------------
def kd_pair(mode, *flags):
    torch.manual_seed(0)
    return pair_of(mode, *flags, arch=ARCH)


def test_feature_kd_loss_is_the_summed_mse_of_the_residual_streams():
    model = kd_pair('feature_kd', '--end_layer', '-1').train()  # layers 0 and 1 of 3
    assert model.layer_pairs == [(0, 0), (1, 1)]
    x = torch.randn(3, 3, 32, 32)
    out, loss = model(x)
    expected, sx, tx = 0.0, tokens(model.student, x), tokens(model.teacher, x)
    with torch.no_grad():
        for i, (s_blk, t_blk) in enumerate(zip(model.student.blocks, model.teacher.blocks)):
            sx, tx = s_blk(sx), t_blk(tx)
            if i in (0, 1):
                expected = expected + ((sx - tx) ** 2).mean()
        assert torch.allclose(out, model.student.forward_head(model.student.norm(sx)), atol=1e-6)
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert loss.grad_fn is not None and loss > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.student(x))  # the student alone at evaluation


@pytest.mark.parametrize('layer_map,pairs', [(None, [(0, 1), (1, 3)]), ('0:0,1:2', [(0, 0), (1, 2)])])
def test_feature_kd_regresses_onto_the_printed_pairs(layer_map, pairs):
    """A 2-block student of a 4-block teacher: the start-up line prints the pairs, and the loss is the summed MSE of
    the student's residual stream after layer i against the teacher's after block j, for exactly those pairs."""
    flags = ['--student_kwargs', 'depth=2'] + (['--layer_map', layer_map] if layer_map else [])
    torch.manual_seed(0)
    model = pair_of('feature_kd', *flags).train()
    assert model.describe_layers() == ', '.join(f'{i}:{j}' for i, j in pairs) + ' (student:teacher)'
    x = torch.randn(2, 3, 32, 32)
    _, loss = model(x)
    with torch.no_grad():
        streams = {}
        for name, vit in (('student', model.student), ('teacher', model.teacher)):
            h, streams[name] = tokens(vit, x), []
            for blk in vit.blocks:
                h = blk(h)
                streams[name].append(h)
        expected = sum(F.mse_loss(streams['student'][i], streams['teacher'][j]) for i, j in pairs)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_feature_kd_refuses_other_widths():
    with pytest.raises(UserError, match='--student_model / --student_kwargs: feature distillation.*widths'):
        kd_pair('feature_kd', '--student_model', 'vit_base_patch16_224', '--student_kwargs',
                *kwargs_flags({**ARCH, 'embed_dim': 32}))


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_logit_kd_loss_is_the_kl_to_the_soft_labels(temperature):
    model = kd_pair('logit_kd', '--kd_temperature', str(temperature)).train()
    with torch.no_grad():  # logits of a few units, as a trained classifier's
        model.teacher.head.weight.mul_(300.0)
        model.student.head.weight.mul_(100.0)
    x = torch.randn(3, 3, 32, 32)
    out, loss = model(x)
    with torch.no_grad():
        t = model.teacher(x)
    p_t = (t / temperature).softmax(1)
    expected = temperature ** 2 * (p_t * ((t / temperature).log_softmax(1)
                                          - (out / temperature).log_softmax(1))).sum(1).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert loss > 0.1


def test_logit_kd_needs_a_teacher_with_a_head(tmp_path):
    model = kd_pair('logit_kd')
    state = {k: v for k, v in model.teacher.state_dict().items() if not k.startswith('head.')}
    torch.save({'model': state}, tmp_path / 'pretrain.pth')
    mode = modes.get_mode('logit_kd')
    cfg = Config.of(dict(finetune=str(tmp_path / 'pretrain.pth'), use_teacher_ema=False, nb_classes=5))
    with pytest.raises(UserError, match='logit_kd.*classifier'):
        mode.load_teacher(model, cfg.finetune, cfg.use_teacher_ema, cfg.nb_classes)
    torch.save({'model': model.teacher.state_dict()}, tmp_path / 'classifier.pth')
    assert 'head.weight' in mode.load_teacher(model, str(tmp_path / 'classifier.pth'), False, 5).loaded


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['feature_kd', 'logit_kd'])
def test_kd_modes_resume_mid_epoch_equal_uninterrupted(workdir, monkeypatch, mode):
    extra = ['--mode', mode, '--ema', '0.9', '--mixup', '0.8', '--drop_path', '0.1', '--print_freq', '1',
             '--checkpoint_minutes', '0']
    full = str(workdir.root / f'{mode}_full')
    main_finetune.run(args_for(workdir, full, *extra))
    part = str(workdir.root / f'{mode}_part')
    stop = run_until_stopped(workdir, monkeypatch, part, 6 + 3, *extra)
    assert (stop.epoch, stop.step) == (1, 3)
    main_finetune.run(args_for(workdir, part, *extra, '--resume', 'allow'))
    a, b = (read_checkpoint(os.path.join(out, 'checkpoint.pth')) for out in (full, part))
    assert a['args']['atd_weight'] == 1.0 and a['epoch'] == b['epoch'] == 1
    assert 'teacher' not in a
    for key in ('model', 'model_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'
    log = read_log(full)
    term = {'feature_kd': 'train_loss_feature', 'logit_kd': 'train_loss_kd'}[mode]
    assert all(e[term] > 0 for e in log) and 'train_loss_atd' not in log[0]
    # the saved student evaluates alone, as a plain ViT
    stats = main_finetune.run(['--eval', '--resume', os.path.join(full, 'checkpoint.pth'), '--data_path',
                               workdir.data, '--output_dir', str(workdir.root / f'{mode}_eval'), '--device', 'cpu',
                               '--num_workers', '0'])
    assert stats['test_acc1'] == log[-1]['test_acc1']


# ---- --student_init ---------------------------------------------------------------------------------
def resolved(argv):
    parser = argparse.ArgumentParser(parents=[main_finetune.get_args_parser()])
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    return main_finetune.resolve_args(args)


@pytest.mark.parametrize('mode', ['distill', 'copy', 'feature_kd'])
def test_student_init_starts_the_student_from_another_model(workdir, tmp_path, mode):
    torch.manual_seed(7)
    other = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model': other.state_dict()}, tmp_path / 'other.pth')
    run = resolved(args_for(workdir, tmp_path / 'out', '--mode', mode, '--student_init', str(tmp_path / 'other.pth')))
    model = main_finetune.build_model(run)
    modes.load_initial_weights(model, run.mode, run.cfg, None)
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    for name, value in other.state_dict().items():
        assert torch.equal(student[name], value), name
    for name, value in read_checkpoint(workdir.teacher)['model'].items():
        assert torch.equal(teacher[name], value), name
    assert not torch.equal(student['blocks.0.attn.qkv.weight'], teacher['blocks.0.attn.qkv.weight'])


def test_student_init_refused_where_it_has_no_meaning(workdir, tmp_path):
    with pytest.raises(UserError, match='--student_init.*--finetune'):
        resolved(args_for(workdir, tmp_path / 'out', '--student_init', workdir.teacher))
    with pytest.raises(UserError, match="--student_init .*missing.pth.*no such file"):
        resolved(args_for(workdir, tmp_path / 'out', '--mode', 'distill', '--student_init', 'missing.pth'))


@pytest.mark.parametrize('flags', [['--transfer_heads', '2'], ['--map_average', 'examples']])
def test_transfer_flags_refused_without_attention_transfer(workdir, tmp_path, flags):
    for mode in ('none', 'feature_kd', 'logit_kd'):
        with pytest.raises(UserError, match=flags[0]):
            main_finetune.run(args_for(workdir, str(tmp_path / mode), '--mode', mode, *flags))


def test_transfer_heads_recorded_and_used_at_evaluation(workdir):
    """A copy student attends with the teacher's maps at evaluation too: --eval --resume takes the heads from the
    checkpoint, and evaluates as the run did."""
    out = str(workdir.root / 'copy_heads')
    stats = main_finetune.run(args_for(workdir, out, '--mode', 'copy', '--transfer_heads', '2', epochs=1))
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert ckpt['args']['transfer_heads'] == '2'
    evaluated = main_finetune.run(['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--data_path',
                                   workdir.data, '--output_dir', str(workdir.root / 'copy_heads_eval'), '--device',
                                   'cpu', '--num_workers', '0'])
    assert evaluated['test_loss'] == pytest.approx(stats['test_loss'], rel=1e-6)


# ---- flags that would do nothing are refused, each by its mode's check --------------------------------------
@pytest.mark.parametrize('mode,flags,message', [
    ('none', ['--layer_map', '0:0'], "^--layer_map 0:0: --mode none has no teacher"),
    ('logit_kd', ['--layer_map', '0:0'], "^--layer_map 0:0: --mode logit_kd compares no layers"),
    ('logit_kd', ['--transfer_layers', '0-1'], "^--transfer_layers 0-1: --mode logit_kd compares no layers"),
    ('feature_kd', ['--transfer_heads', '1'], "^--transfer_heads 1: --mode feature_kd transfers no attention"),
    ('distill', ['--transfer_decay', 'linear'], "^--transfer_decay linear .* --transfer_until EPOCH, which is not "
                                                "given"),
    ('distill', ['--transfer_until', 'inf'], "^--transfer_until inf: the transfer loss never ends"),
    ('copy', ['--map_average', 'examples', '--batch_size', '1'], "^--map_average examples .* --batch_size 1 holds "
                                                                 "one image"),
])
def test_flags_that_do_nothing_are_refused(workdir, tmp_path, mode, flags, message):
    argv = args_for(workdir, tmp_path / 'refused', '--mode', mode, *flags)
    with pytest.raises(UserError, match=message):
        resolved(argv)
    assert not (tmp_path / 'refused').exists()


def test_a_reversed_head_range_speaks_of_heads():
    with pytest.raises(UserError, match=r"^--transfer_heads: '1-0': the range '1-0' selects no head; write the lower "
                                        r"index first \('0-1'\)"):
        pair_of('copy', '--transfer_heads', '1-0', arch=ARCH)


def test_timm_spelling_of_a_class_token_free_vit():
    """--model_kwargs class_token=False global_pool=avg, as timm spells a ViT without a class token: the pooling is
    taken from the arguments, not passed twice."""
    model = pair_of('distill', '--model_kwargs', *kwargs_flags(ARCH), 'class_token=False', 'global_pool=avg')
    assert model.student.cls_token is None and model.teacher.cls_token is None
    assert model.student.global_pool == 'avg'
