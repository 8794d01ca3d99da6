"""--transfer_loss: the attention map losses of --mode distill (ce, reverse_kl, js, mse), each against its formula
written out here in float64, the fused path against the explicit one, --transfer_heads, the command line's
refusals, a short run with each loss, and the loss in the model a checkpoint records.

The reference numbers are computed from maps, q and k written out, never through models_transfer_losses.
"""
import copy
import math
import os
import re

import pytest
import torch
from helpers import make_teacher_checkpoint, tiny_args
from test_families import randomise

import main_finetune
import models_dual_vit
from models_attention import TRANSFER_MODES, average_maps
from models_dual_vit import DualViT, build_dual_vit
from models_pair import ModelArgumentError
from models_spec import ModelSpec
from models_transfer_losses import FUSED_MAP_LOSSES, FUSED_TRANSFER_LOSSES, TRANSFER_LOSSES, transfer_loss
from util.errors import UserError
from util.model_record import changed_flags
from util.pretrained import read_checkpoint

DISTILL = TRANSFER_MODES['distill']
# the tiny pair of these tests: 2 blocks, width 32, 2 heads; 16 x 16 images in patches of 8 (4 patches + class token)
ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
ARCH_FLAGS = ['--input_size', '16', '--model_kwargs', *(f'{k}={v}' for k, v in ARCH.items())]


# ---- the formulas, written out in float64 ------------------------------------------------------------------
def by_formula(loss, s_logits, t_logits):
    """Mean over (batch, head, query row) of the row loss between P_t = softmax(t_logits), P_s = softmax(s_logits)."""
    p_s, p_t = s_logits.double().softmax(-1), t_logits.double().softmax(-1)
    if loss == 'ce':
        rows = -(p_t * p_s.log()).sum(-1)
    elif loss == 'reverse_kl':
        rows = (p_s * (p_s.log() - p_t.log())).sum(-1)
    elif loss == 'js':
        m = (p_t + p_s) / 2
        rows = 0.5 * (p_t * (p_t / m).log()).sum(-1) + 0.5 * (p_s * (p_s / m).log()).sum(-1)
    else:  # mse: the sum over keys of the squared difference, averaged over rows
        rows = ((p_s - p_t) ** 2).sum(-1)
    return rows.mean()


def scores(q, k, scale, bias=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return s if bias is None else s + bias.double()


def assert_close_rel(actual, expected, rtol=1e-6, what=''):
    """|actual - expected| <= rtol * max |expected|, elementwise."""
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)
    assert err <= rtol, f"{what}: relative difference {err:.2e}"


@pytest.fixture
def maps():
    """Float64 student and teacher logits (2 images, 3 heads, 7 x 7), sharp enough that the losses differ."""
    gen = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=gen) * 3 for _ in range(2))
    return s, t


@pytest.fixture
def qk():
    """Float64 q and k of a student (head_dim 8) and a wider teacher (head_dim 16), 2 images, 3 heads, 13 tokens, with
    relative-position-like score biases (the student's broadcast over images, the teacher's per image)."""
    gen = torch.Generator().manual_seed(1)

    def draw(*shape, spread=2.0):
        return torch.randn(*shape, dtype=torch.float64, generator=gen) * spread

    return dict(q_s=draw(2, 3, 13, 8), k_s=draw(2, 3, 13, 8), q_t=draw(2, 3, 13, 16), k_t=draw(2, 3, 13, 16),
                bias_s=draw(3, 13, 13, spread=1.0), bias_t=draw(2, 3, 13, 13, spread=1.0))


def explicit_captures(s_logits, t_logits):
    """What the explicit attention captures of a student's and a teacher's map."""
    return ({'attn_logits': s_logits, 'attn': s_logits.softmax(-1)},
            {'attn_logits': t_logits, 'attn': t_logits.softmax(-1)})


def fused_captures(qk, bias, **grad):
    """What the fused attention captures (q, k, their scale, the score bias), the student's q and k (and bias)
    requiring gradients, and the teacher's where ``grad`` says so."""
    def leaf(name):
        return qk[name].clone().requires_grad_(grad.get(name, name.endswith('_s')))

    student = {'q': leaf('q_s'), 'k': leaf('k_s'), 'scale': 8 ** -0.5}
    teacher = {'q': leaf('q_t'), 'k': leaf('k_t'), 'scale': 16 ** -0.5}
    if bias:
        student['bias'], teacher['bias'] = leaf('bias_s'), qk['bias_t']
    return student, teacher


# ---- each loss against its formula: value and gradient ----------------------------------------------------
@pytest.mark.parametrize('loss', TRANSFER_LOSSES)
def test_explicit_loss_equals_its_formula(maps, loss):
    s, t = maps
    s = s.clone().requires_grad_(True)
    value = transfer_loss(DISTILL, *explicit_captures(s, t), 'explicit', loss)
    s_ref = s.detach().clone().requires_grad_(True)
    expected = by_formula(loss, s_ref, t)
    assert_close_rel(value, expected, what='value')
    assert_close_rel(torch.autograd.grad(value, s)[0], torch.autograd.grad(expected, s_ref)[0], what='gradient')


@pytest.mark.parametrize('loss', FUSED_TRANSFER_LOSSES)
@pytest.mark.parametrize('bias', [False, True], ids=['no_bias', 'score_bias'])
def test_fused_loss_equals_its_formula(qk, loss, bias):
    """From q and k through the attention kernels, chunked over 5 query rows: the value and the gradients to the
    student's q, k and score bias and to the teacher's q and k equal those of the formula on the explicit scores
    (ce's teacher gradient leaves out the part its student bias term carries: the teacher is frozen, so ce checks
    the teacher's gradient without a bias only)."""
    teacher_grad = loss != 'ce' or not bias
    names = ['q_s', 'k_s'] + (['q_t', 'k_t'] if teacher_grad else []) + (['bias_s'] if bias else [])
    student, teacher = fused_captures(qk, bias, q_t=teacher_grad, k_t=teacher_grad)
    value = FUSED_MAP_LOSSES[loss](student['q'], student['k'], teacher['q'], teacher['k'], student['scale'],
                                   teacher['scale'], chunk=5, bias_s=student.get('bias'), bias_t=teacher.get('bias'))
    ref = {name: qk[name].clone().requires_grad_(name in names) for name in ('q_s', 'k_s', 'q_t', 'k_t', 'bias_s')}
    expected = by_formula(loss, scores(ref['q_s'], ref['k_s'], 8 ** -0.5, ref['bias_s'] if bias else None),
                          scores(ref['q_t'], ref['k_t'], 16 ** -0.5, qk['bias_t'] if bias else None))
    assert_close_rel(value, expected, what='value')
    captured = {'q_s': student['q'], 'k_s': student['k'], 'q_t': teacher['q'], 'k_t': teacher['k'],
                'bias_s': student.get('bias')}
    inputs, ref_inputs = [captured[name] for name in names], [ref[name] for name in names]
    for name, g, r in zip(names, torch.autograd.grad(value, inputs), torch.autograd.grad(expected, ref_inputs)):
        assert_close_rel(g, r, what=name)


def test_the_losses_differ_and_vanish_where_the_maps_agree(maps):
    """Four different numbers on the same maps; reverse_kl, js and mse are 0 for equal maps, ce their entropy."""
    s, t = maps
    values = {loss: transfer_loss(DISTILL, *explicit_captures(s, t), 'explicit', loss).item()
              for loss in TRANSFER_LOSSES}
    assert len({round(v, 6) for v in values.values()}) == 4, values
    for loss in ('reverse_kl', 'js', 'mse'):
        assert transfer_loss(DISTILL, *explicit_captures(t, t), 'explicit', loss).abs().item() < 1e-12, loss
    p = t.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert_close_rel(transfer_loss(DISTILL, *explicit_captures(t, t), 'explicit', 'ce'), entropy, 1e-12)


def test_the_losses_run_in_float32_under_bf16_autocast_and_stay_finite_on_one_hot_rows(qk):
    """Under bf16 autocast every loss is computed in float32: the explicit ones from the float32 logits the explicit
    attention captures, the fused reverse_kl from bf16 q and k (to 1e-5 of float64 on the same bf16 values; a bf16
    computation would be off by ~1e-2). One-hot teacher rows (log P_t of -1e4 and below) give finite values and
    gradients."""
    q_s, k_s, q_t, k_t = (qk[name].bfloat16() for name in ('q_s', 'k_s', 'q_t', 'k_t'))
    s_logits, t_logits = scores(q_s, k_s, 8 ** -0.5), scores(q_t, k_t, 16 ** -0.5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        values = {loss: transfer_loss(DISTILL, *explicit_captures(s_logits.float(), t_logits.float()), 'explicit',
                                      loss) for loss in TRANSFER_LOSSES}
        fused = transfer_loss(DISTILL, {'q': q_s, 'k': k_s, 'scale': 8 ** -0.5},
                              {'q': q_t, 'k': k_t, 'scale': 16 ** -0.5}, 'fused', 'reverse_kl')
    for loss, value in values.items():
        assert value.dtype == torch.float32, loss
        assert_close_rel(value.double(), by_formula(loss, s_logits.float(), t_logits.float()), 1e-6, loss)
    assert fused.dtype == torch.float32
    assert_close_rel(fused.double(), by_formula('reverse_kl', s_logits, t_logits), 1e-5, 'fused reverse_kl')
    one_hot = qk['q_t'] * 300.0
    student, teacher = fused_captures({**qk, 'q_t': one_hot}, bias=False)
    value = transfer_loss(DISTILL, student, teacher, 'fused', 'reverse_kl')
    grads = torch.autograd.grad(value, [student['q'], student['k']])
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    for loss in TRANSFER_LOSSES:
        s = scores(qk['q_s'], qk['k_s'], 8 ** -0.5).requires_grad_(True)
        value = transfer_loss(DISTILL, *explicit_captures(s, scores(one_hot, qk['k_t'], 16 ** -0.5)), 'explicit', loss)
        assert torch.isfinite(value) and torch.isfinite(torch.autograd.grad(value, s)[0]).all(), loss


@pytest.mark.parametrize('impl,loss', [('explicit', loss) for loss in TRANSFER_LOSSES]
                         + [('fused', loss) for loss in FUSED_TRANSFER_LOSSES])
def test_transfer_heads_restrict_every_loss_to_their_heads(maps, qk, loss, impl):
    """--transfer_heads 0,2 of 3: the loss is that of heads 0 and 2 alone (their mean), for every loss and path."""
    heads = [0, 2]
    if impl == 'explicit':
        s, t = maps
        student, teacher = explicit_captures(s, t)
        expected = by_formula(loss, s[:, heads], t[:, heads])
    else:
        student, teacher = fused_captures(qk, bias=True)
        expected = by_formula(loss, scores(qk['q_s'][:, heads], qk['k_s'][:, heads], 8 ** -0.5, qk['bias_s'][heads]),
                              scores(qk['q_t'][:, heads], qk['k_t'][:, heads], 16 ** -0.5, qk['bias_t'][:, heads]))
    value = transfer_loss(DISTILL, student, {**teacher, 'heads': (0, 2)}, impl, loss)
    assert_close_rel(value, expected, what='value')


@pytest.mark.parametrize('how', ['examples', 'queries'])
def test_averaged_maps_carry_their_log_probabilities(maps, how):
    """--map_average: the averaged map's logits are log A' (so reverse_kl and js read finite log-probabilities),
    also where a probability underflows in every averaged map."""
    _, t = maps
    t = t.clone()
    t[..., 3] = -1e4  # key 3 gets probability exp(-1e4) = 0 in every row of every map
    captured = {'attn_logits': t, 'attn': t.softmax(-1)}
    averaged = average_maps(captured, how)
    dim = 0 if how == 'examples' else 2
    mean = t.softmax(-1).mean(dim, keepdim=True).expand_as(t)
    torch.testing.assert_close(averaged['attn'], mean, rtol=0, atol=0)
    finite = [j for j in range(7) if j != 3]
    torch.testing.assert_close(averaged['attn_logits'][..., finite], mean[..., finite].log(), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(averaged['attn_logits']).all()
    s = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for loss in TRANSFER_LOSSES:
        student = {'attn_logits': s, 'attn': s.softmax(-1)}
        assert torch.isfinite(transfer_loss(DISTILL, student, averaged, 'explicit', loss)), loss


# ---- the pair: fused equals explicit, ce unchanged, each loss trains ---------------------------------------
def tiny_pair(impl, loss, family='vit_base_patch16_224', drop_path=0.2, **kw):
    torch.manual_seed(0)
    model = build_dual_vit(family, mode='distill', num_classes=3, img_size=16, teacher_kwargs=ARCH, attention_impl=impl,
                           transfer_loss=loss, drop_path_rate=drop_path, **kw).double()
    randomise(model.teacher, seed=1)
    randomise(model.student, seed=2)
    return model


def loss_and_grads(model, x, masks):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, drop_path_masks=masks)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('loss', FUSED_TRANSFER_LOSSES)
@pytest.mark.parametrize('family,heads', [('vit_base_patch16_224', None), ('vit_base_patch16_224', '1'),
                                          ('beitv2_base_patch16_224', None)], ids=['vit', 'vit_head1', 'beit'])
def test_fused_equals_explicit_in_the_pair(loss, family, heads):
    """The pair's summed loss and the gradient of every student parameter, fused against explicit, with shared
    drop-path masks; BEiT's relative position bias table gets its gradient through the fused loss too."""
    fused, explicit = tiny_pair('fused', loss, family, transfer_heads=heads), tiny_pair('explicit', loss, family,
                                                                                      transfer_heads=heads)
    explicit.load_state_dict(fused.state_dict())
    fused.train()
    explicit.train()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    masks = fused.draw_drop_path_masks(3, x.device)
    (a, grads_a), (b, grads_b) = loss_and_grads(fused, x, masks), loss_and_grads(explicit, x, masks)
    assert_close_rel(a, b, 1e-9, 'loss')
    assert grads_a.keys() == grads_b.keys() and 'blocks.0.attn.qkv.weight' in grads_a
    if family.startswith('beit'):
        assert 'blocks.0.attn.relative_position_bias_table' in grads_a
    for name in grads_a:
        assert_close_rel(grads_a[name], grads_b[name], 1e-7, name)


@pytest.mark.parametrize('impl', ['explicit', 'fused'])
def test_ce_is_the_default_and_unchanged(impl):
    """ce is the default of the command line, of build_dual_vit and of DualViT, and transfer_loss='ce' is the pair
    built without the argument, bit for bit (loss and gradients)."""
    assert main_finetune.get_args_parser().parse_args([]).transfer_loss == 'ce'
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    chosen = tiny_pair(impl, 'ce')
    default = DualViT(copy.deepcopy(chosen.student), copy.deepcopy(chosen.teacher), mode='distill',
                      attention_impl=impl)
    assert default.transfer_loss == 'ce'
    assert build_dual_vit('vit_base_patch16_224', mode='distill', num_classes=3, img_size=16, teacher_kwargs=ARCH,
                          attention_impl=impl).transfer_loss == 'ce'
    chosen.train()
    default.train()
    masks = chosen.draw_drop_path_masks(3, x.device)
    (a, grads_a), (b, grads_b) = loss_and_grads(chosen, x, masks), loss_and_grads(default, x, masks)
    assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)


@pytest.mark.parametrize('loss', TRANSFER_LOSSES)
def test_a_step_on_each_loss_lowers_it(loss):
    """The loss's gradient trains the student: one small SGD step on the transfer loss alone lowers it."""
    model = tiny_pair('fused' if loss in FUSED_TRANSFER_LOSSES else 'explicit', loss, drop_path=0.0)
    model.train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    before, grads = loss_and_grads(model, x, None)
    with torch.no_grad():
        for name, p in model.student.named_parameters():
            if name in grads:
                p -= 1e-2 * grads[name] / max(g.abs().max() for g in grads.values())
    after, _ = loss_and_grads(model, x, None)
    assert after < before, (before, after)


def test_the_pair_refuses_what_has_no_path():
    with pytest.raises(ModelArgumentError, match="'js' compares the N x N maps entry by entry") as err:
        tiny_pair('fused', 'js')
    assert err.value.argument == 'transfer_loss'
    with pytest.raises(ModelArgumentError, match="mode copy compares no attention maps by a loss"):
        build_dual_vit('vit_base_patch16_224', mode='copy', num_classes=3, img_size=16, teacher_kwargs=ARCH,
                       attention_impl='explicit', transfer_loss='mse')
    with pytest.raises(ModelArgumentError, match="'kl': choose one of ce, reverse_kl, js, mse"):
        tiny_pair('explicit', 'kl')


# ---- the command line ----------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    return make_teacher_checkpoint(str(tmp_path_factory.mktemp('loss_teacher') / 'teacher.pth'), img_size=16, **ARCH)


@pytest.fixture(scope='module')
def runs(shared_images, tiny_teacher, tmp_path_factory):
    """run(loss): a one-epoch distill run with --transfer_loss loss (once per module), its folder and the loss
    names the pair's layers computed."""
    data = shared_images(train_per_class=8, val_per_class=3, size=16)
    root, done = tmp_path_factory.mktemp('loss_runs'), {}

    def run(loss):
        if loss not in done:
            used = []
            compute = models_dual_vit.transfer_loss
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(models_dual_vit, 'transfer_loss',
                              lambda *a: used.append(a[-1]) or compute(*a))
                stats = main_finetune.run(command(data, str(root / loss), tiny_teacher, '--transfer_loss', loss))
            done[loss] = (str(root / loss), stats, used)
        return done[loss]

    run.data = data
    return run


def command(data, out, teacher, *extra):
    return tiny_args(data, out, '--finetune', teacher, '--mode', 'distill', '--lr', '3e-3', *ARCH_FLAGS, *extra,
                     epochs=1)


@pytest.mark.parametrize('loss', TRANSFER_LOSSES)
def test_a_short_distill_run_trains_with_each_loss(runs, loss):
    out, stats, used = runs(loss)
    assert set(used) == {loss} and len(used) == 3 * 2  # 3 steps, 2 transferred layers
    assert math.isfinite(stats['train_loss_atd']) and stats['train_loss_atd'] > 0
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert ckpt['args']['transfer_loss'] == loss and ckpt['args']['model_spec']['transfer_loss'] == loss
    assert ckpt['args']['attention_impl'] == 'explicit'  # --attention_impl auto on the CPU


def test_auto_takes_the_explicit_maps_for_the_losses_without_a_fused_path():
    """The one decision of --attention_impl auto (main_finetune.attention_impl_for): explicit for js and mse on any
    device; ce and reverse_kl leave it to the device (fused on CUDA)."""
    def chosen(loss):
        return main_finetune.attention_impl_for('auto', 'none', loss)

    assert {loss: chosen(loss) for loss in TRANSFER_LOSSES} == {'ce': 'auto', 'reverse_kl': 'auto', 'js': 'explicit',
                                                                'mse': 'explicit'}


@pytest.mark.parametrize('mode,message', [
    ('copy', "^--transfer_loss js: --mode copy compares no attention maps by a loss"),
    ('distill_q', "^--transfer_loss js: --mode distill_q compares no attention maps by a loss"),
    ('none', "^--transfer_loss js: --mode none has no teacher"),
    ('feature_kd', "^--transfer_loss js: --mode feature_kd transfers no attention"),
])
def test_other_modes_refuse_the_flag(runs, tiny_teacher, tmp_path, mode, message):
    argv = tiny_args(runs.data, str(tmp_path / 'out'), '--finetune', tiny_teacher, *ARCH_FLAGS, '--mode', mode,
                     '--transfer_loss', 'js')
    with pytest.raises(UserError, match=message):
        main_finetune.resolve_args(main_finetune.get_args_parser().parse_args(argv))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('loss', ['js', 'mse'])
def test_fused_attention_is_refused_for_the_entrywise_losses(runs, tiny_teacher, tmp_path, loss):
    argv = command(runs.data, str(tmp_path / 'out'), tiny_teacher, '--transfer_loss', loss, '--attention_impl', 'fused')
    with pytest.raises(UserError, match=rf"^--transfer_loss {loss} with --attention_impl fused: .* Use "
                                        r"--attention_impl explicit .*fused path are ce, reverse_kl$"):
        main_finetune.resolve_args(main_finetune.get_args_parser().parse_args(argv))


def test_resuming_with_another_loss_is_refused_naming_it(runs, tiny_teacher):
    """The loss is part of the run's model description: a resumed run that would change it is refused, naming the
    change (as for the heads or the pairing)."""
    out, _, _ = runs('ce')
    with pytest.raises(UserError, match=re.escape("transfer_loss: ce -> js")):
        main_finetune.run(command(runs.data, out, tiny_teacher, '--resume', 'allow', '--transfer_loss', 'js'))


def test_a_changed_loss_is_a_changed_flag():
    assert changed_flags({'transfer_loss': 'ce'}, {'transfer_loss': 'js'}) == [
        "--transfer_loss: ce in the checkpoint's run, js from here on"]


def test_eval_resume_refuses_a_contradicting_loss_and_evaluates_the_recorded_one(runs, tmp_path):
    out, stats, _ = runs('js')
    argv = ['--eval', '--resume', os.path.join(out, 'checkpoint.pth'), '--data_path', runs.data, '--output_dir',
            str(tmp_path / 'eval'), '--device', 'cpu', '--num_workers', '0']
    with pytest.raises(UserError, match=re.escape("--transfer_loss ce: the evaluated checkpoint's model has "
                                                  "transfer_loss js, and --eval --resume evaluates that model")):
        main_finetune.run(argv + ['--transfer_loss', 'ce'])
    evaluated = main_finetune.run(argv + ['--transfer_loss', 'js'])
    assert evaluated['test_loss'] == pytest.approx(stats['test_loss'], rel=1e-6)


def test_records_without_the_loss_load_as_ce():
    spec = ModelSpec.from_record({**tiny_record(), 'transfer_loss': 'mse'})
    assert spec.transfer_loss == 'mse'
    older = tiny_record()
    del older['transfer_loss']
    assert ModelSpec.from_record(older).transfer_loss == 'ce'


def tiny_record() -> dict:
    from models_spec import Architecture

    return ModelSpec(mode='distill', student=Architecture('vit_base_patch16_224', ARCH), num_classes=3, img_size=16,
                     teacher=Architecture('vit_base_patch16_224', ARCH), pairs=((0, 0), (1, 1)),
                     layers=(0, 1)).to_record()
