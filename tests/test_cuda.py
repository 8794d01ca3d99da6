"""On a CUDA GPU (skipped without one; benchmarks/gpu_report.py runs this file as its first part): every
transfer mode under bf16 autocast against float32 on the same weights, the fused path against the explicit
one and on the flash / memory-efficient kernels, the distillation loss under bf16 autocast (accumulated in
float32), a DDP step under torchrun, a checkpoint and an exact resume.

References are float32 (or float64) computations of the same weights and inputs; the tolerances are bf16's
or float32's rounding, far below what a wrong map, scale or layer gives (differences of order one)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, free_port, make_image_folder, make_teacher_checkpoint, tiny_args

from models_attention import TRANSFER_MODES
from models_dual_vit import build_dual_vit
from models_transfer_losses import attention_distillation_loss
from util.pretrained import read_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

DEVICE = 'cuda'
# head_dim 64, as in every ViT size, so that SDPA can use its flash and memory-efficient kernels;
# 64 px / patch 8: 64 patches + the class token
ARCH = dict(patch_size=8, embed_dim=128, depth=3, num_heads=2)
SIZE = 64


def pair(mode, impl='fused', narrow_student=False, drop_path=0.1):
    """A float32 pair on the GPU with sharp teacher maps (so that a wrong map shows)."""
    torch.manual_seed(0)
    kw = {}
    if narrow_student:  # same heads and tokens, half the head_dim
        kw = dict(student_model='vit_base_patch16_224', student_kwargs={**ARCH, 'embed_dim': ARCH['embed_dim'] // 2})
    model = build_dual_vit('vit_base_patch16_224', mode=mode, drop_path_rate=drop_path, num_classes=5,
                           img_size=SIZE, teacher_kwargs=ARCH, attention_impl=impl, end_layer=-1, **kw)
    with torch.no_grad():
        for blk in model.teacher.blocks:
            blk.attn.qkv.weight[:2 * blk.attn.attn_dim].mul_(6.0)
    return model.to(DEVICE)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, SIZE, SIZE, generator=g).to(DEVICE), torch.randint(0, 5, (n,), generator=g).to(DEVICE))


def train_step(model, x, y, masks, amp):
    """(logits, transfer loss, flat student gradient) of cross-entropy + transfer loss, in float32."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=amp, enabled=amp is not None):
        out = model(x, drop_path_masks=masks)
    logits, aux = out if isinstance(out, tuple) else (out, torch.zeros((), device=DEVICE))
    (F.cross_entropy(logits.float(), y) + aux.float()).backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.student.parameters() if p.grad is not None])
    return logits.detach().float(), aux.detach().float(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def cosine(a, b):
    return F.cosine_similarity(a, b, dim=0).item()


# ---- 1. bf16 autocast against float32 -------------------------------------------------------------
@pytest.mark.parametrize('impl', ['fused', 'explicit'])
@pytest.mark.parametrize('mode', list(TRANSFER_MODES))
def test_bf16_autocast_step_matches_float32(mode, impl):
    model = pair(mode, impl)
    x, y = batch()
    masks = model.draw_drop_path_masks(len(x), x.device)
    ref_logits, ref_aux, ref_grads = train_step(model, x, y, masks, None)
    logits, aux, grads = train_step(model, x, y, masks, torch.bfloat16)
    assert rel(logits, ref_logits) < 5e-2
    if TRANSFER_MODES[mode].use == 'loss':
        assert ref_aux > 0 and abs(aux.item() / ref_aux.item() - 1) < 5e-2
    assert cosine(grads, ref_grads) > 0.99 and rel(grads, ref_grads) < 0.15
    model.eval()  # copy modes run the teacher at evaluation too
    with torch.no_grad():
        ref_eval = model(x).float()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            assert rel(model(x).float(), ref_eval) < 5e-2


# ---- 2. fused against explicit, and on the fast kernels --------------------------------------------
@pytest.mark.parametrize('mode,narrow', [(m, False) for m in TRANSFER_MODES] + [('copy', True), ('distill', True)])
def test_fused_equals_explicit_in_float32(mode, narrow):
    fused, explicit = pair(mode, 'fused', narrow), pair(mode, 'explicit', narrow)
    explicit.load_state_dict(fused.state_dict())
    x, y = batch()
    masks = fused.draw_drop_path_masks(len(x), x.device)
    a, b = train_step(fused, x, y, masks, None), train_step(explicit, x, y, masks, None)
    assert rel(a[0], b[0]) < 1e-3
    assert abs(a[1].item() - b[1].item()) <= 1e-3 * max(b[1].item(), 1e-3)
    assert rel(a[2], b[2]) < 1e-3


@pytest.mark.parametrize('mode,narrow', [('copy', False), ('copy', True), ('copy_q', False), ('copy_v', False),
                                         ('distill', False), ('distill', True), ('distill_k', False)])
def test_fused_step_runs_on_flash_or_memory_efficient_kernels(mode, narrow):
    """No math fallback (which builds the N x N map): SDPA is limited to the flash and memory-efficient kernels."""
    attention = pytest.importorskip('torch.nn.attention')
    model = pair(mode, 'fused', narrow)
    x, y = batch()
    with attention.sdpa_kernel([attention.SDPBackend.FLASH_ATTENTION, attention.SDPBackend.EFFICIENT_ATTENTION]):
        logits, aux, grads = train_step(model, x, y, model.draw_drop_path_masks(len(x), x.device), torch.bfloat16)
    assert torch.isfinite(logits).all() and torch.isfinite(aux) and torch.isfinite(grads).all()


@pytest.mark.parametrize('mode', ['copy', 'distill'])
def test_fused_saves_no_n_by_n_tensor_on_cuda(mode):
    n = (SIZE // ARCH['patch_size']) ** 2 + 1
    model = pair(mode)
    model.train()
    shapes = []
    x, _ = batch()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            model(x)
    assert shapes and not [s for s in shapes if s[-2:] == (n, n)]


# ---- 3. the distillation loss under bf16 autocast ----------------------------------------------------
def explicit_ce64(q_s, k_s, q_t, k_t, scale_s, scale_t):
    s = (q_s.double() @ k_s.double().transpose(-1, -2)) * scale_s
    t = (q_t.double() @ k_t.double().transpose(-1, -2)) * scale_t
    return -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize('n,chunk', [(197, None), (785, None), (785, 100)])
def test_distillation_loss_under_bf16_autocast_accumulates_in_float32(n, chunk):
    g = torch.Generator().manual_seed(0)
    q_s, k_s, q_t, k_t = ((torch.randn(2, 4, n, 64, generator=g) * 2.0).to(DEVICE, torch.bfloat16) for _ in range(4))
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = attention_distillation_loss(q_s, k_s, q_t, k_t, 0.125, 0.125, chunk=chunk)
    assert loss.dtype == torch.float32
    ref_inputs = [a.detach().double().requires_grad_(True) for a in (q_s, k_s)]
    ref = explicit_ce64(*ref_inputs, q_t, k_t, 0.125, 0.125)
    # from the same bf16 values in float64: a bf16 computation would be off by about 1e-2
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=0)
    grads = torch.autograd.grad(loss, (q_s, k_s))
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=2e-2 * ref_grad.abs().max().item())


# ---- 4. DDP on one GPU under torchrun ----------------------------------------------------------------
@pytest.mark.slow
def test_ddp_step_on_one_gpu_under_torchrun(tmp_path):
    out = tmp_path / 'ddp.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port', str(free_port()),
           os.path.join(ROOT, 'tests', 'cuda_ddp_worker.py'), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result['backend'] == 'nccl' and result['world_size'] == 1
    assert result['teacher_ignored'] and result['teacher_grads'] == 0
    assert result['grad_rel_diff'] < 1e-2  # the DDP step's gradients are the plain step's
    assert result['params_changed'] and result['finite']


# ---- 5. a checkpoint and an exact resume on CUDA ----------------------------------------------------
RUNNER = """
import os, sys, torch
torch.use_deterministic_algorithms(True)
import main_finetune
from util.losses import TransferCriterion
from util.run_control import Preempted, request_stop
stop_at = int(os.environ.get('STOP_AT_CALL', '0'))
if stop_at:
    forward, calls = TransferCriterion.forward, [0]
    def stopping(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at:
            request_stop()
        return forward(self, *args, **kwargs)
    TransferCriterion.forward = stopping
try:
    main_finetune.run(sys.argv[1:])
except Preempted as stop:
    print(f'PREEMPTED {stop.epoch} {stop.step}')
"""


def run_main(argv, stop_at=0):
    env = {**os.environ, 'CUBLAS_WORKSPACE_CONFIG': ':4096:8', 'STOP_AT_CALL': str(stop_at)}
    proc = subprocess.run([sys.executable, '-c', RUNNER, *argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_checkpoint_and_exact_resume_on_cuda(tmp_path):
    """Stopped inside the second epoch and resumed, a bf16 distill run on the GPU ends with the uninterrupted
    run's weights, bit for bit (deterministic kernels; the checkpoint carries the CUDA generator)."""
    data = make_image_folder(str(tmp_path / 'data'))
    teacher = make_teacher_checkpoint(str(tmp_path / 'teacher.pth'))

    def argv(name, *extra):
        args = tiny_args(data, str(tmp_path / name), '--finetune', teacher, '--mode', 'distill', '--drop_path', '0.2',
                         '--ema', '0.9', '--amp', 'bf16', '--print_freq', '1', '--checkpoint_minutes', '0', *extra)
        args[args.index('--device') + 1] = DEVICE
        return args

    run_main(argv('full'))
    stopped = run_main(argv('part'), stop_at=6 + 3)  # epoch 1, step 3 of 6
    assert 'PREEMPTED 1 3' in stopped
    saved = read_checkpoint(str(tmp_path / 'part' / 'checkpoint.pth'))
    assert (saved['epoch'], saved['step']) == (1, 3) and 'cuda' in (saved.get('rng') or {})
    assert saved['args']['attention_impl'] == 'fused'  # --attention_impl auto on CUDA
    run_main(argv('part', '--resume', 'allow'))
    a = read_checkpoint(str(tmp_path / 'full' / 'checkpoint.pth'))
    b = read_checkpoint(str(tmp_path / 'part' / 'checkpoint.pth'))
    assert a['epoch'] == b['epoch'] == 1
    for key in ('model', 'model_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'
    for pid, state in a['optimizer']['state'].items():
        assert torch.equal(state['exp_avg_sq'], b['optimizer']['state'][pid]['exp_avg_sq'])
