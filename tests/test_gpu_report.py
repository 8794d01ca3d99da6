"""benchmarks/gpu_report.py: its --smoke run (every part on CPU, so the script is known to work before a GPU
sees it), and what its tables rest on: the chunked formulation of the distillation loss it compares with the
library's, the authors' approach computing the same model as the library's explicit path, the FLOP count
behind MFU, and the peak memory of an isolated measurement."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY_ARCH

import models_dual_vit
from benchmarks import gpu_report
from models_dual_vit import DualViT, create_vit


def explicit_ce64(q_s, k_s, q_t, k_t, scale_s, scale_t):
    s = (q_s.double() @ k_s.double().transpose(-1, -2)) * scale_s
    t = (q_t.double() @ k_t.double().transpose(-1, -2)) * scale_t
    return -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()


def table(report: str, title: str) -> list[list[str]]:
    """The data rows of the first markdown table under ``## title``."""
    section = report.split(f'## {title}\n', 1)[1].split('\n## ', 1)[0]
    lines = [line for line in section.splitlines() if line.startswith('|')]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]


@pytest.mark.slow
def test_smoke_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / 'report.md'
    proc = subprocess.run([sys.executable, os.path.join('benchmarks', 'gpu_report.py'), '--smoke', '--output',
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert f"- torch {torch.__version__}" in report and '- command: `python benchmarks/gpu_report.py --smoke' in report

    tests = table(report, 'CUDA tests')  # without a GPU every CUDA test is collected and skipped
    assert len(tests) >= 10 and all(row[1] == 'skipped' and 'needs a CUDA GPU' in row[3] for row in tests)

    steps = table(report, 'Step table')  # 2 sizes x 13 rows, each with a speed and an MFU
    assert len(steps) == 2 * 13
    assert {row[4] for row in steps} == set(gpu_report.PATH_NAMES.values())
    for row in steps:
        assert float(row[5]) > 0 and float(row[6]) > 0 and re.fullmatch(r"\d+\.\d%", row[9]), row

    losses = table(report, 'The distillation loss alone')  # 2 token counts x 3 formulations, equal values
    assert len(losses) == 6
    assert all(float(row[2]) > 0 and abs(float(row[6])) < 1e-5 for row in losses)

    loader = table(report, 'Loader against step')
    assert [row[0] for row in loader] == ['32', '64'] and all(float(row[1]) > 0 and float(row[3]) > 0
                                                               for row in loader)


@pytest.mark.parametrize('n,chunk', [(37, 16), (21, 64)])
def test_chunked_formulation_equals_explicit_float64(n, chunk):
    q_s, k_s = (torch.randn(2, 3, n, 8, dtype=torch.float64) * 2 for _ in range(2))
    q_t, k_t = (torch.randn(2, 3, n, 16, dtype=torch.float64) * 2 for _ in range(2))
    inputs = [a.clone().requires_grad_(True) for a in (q_s, k_s, q_t, k_t)]
    ref_inputs = [a.clone().requires_grad_(True) for a in (q_s, k_s, q_t, k_t)]
    loss = gpu_report.chunked_distillation_loss(*inputs, 8 ** -0.5, 16 ** -0.5, chunk=chunk)
    ref = explicit_ce64(*ref_inputs, 8 ** -0.5, 16 ** -0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for g, r in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, ref_inputs)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # and the transfer loop takes it in place of the library's formulation while (only while) asked to
    with gpu_report.distillation_loss(gpu_report.chunked_distillation_loss):
        assert models_dual_vit.attention_distillation_loss is gpu_report.chunked_distillation_loss
    assert models_dual_vit.attention_distillation_loss is gpu_report.library_distillation_loss


def tiny_models(drop_path=0.2):
    cfg = dict(TINY_ARCH)
    torch.manual_seed(0)
    teacher = create_vit('vit_base_patch16_224', num_classes=5, img_size=32, **cfg).double()
    student = create_vit('vit_base_patch16_224', num_classes=5, img_size=32, drop_path_rate=drop_path, **cfg).double()
    with torch.no_grad():
        for blk in teacher.blocks:
            blk.attn.qkv.weight[:2 * blk.attn.attn_dim].mul_(6.0)
    return teacher, student


@pytest.mark.parametrize('mode', ['copy', 'distill'])
def test_authors_approach_computes_the_librarys_model(mode):
    """Same logits, loss and gradients as the library's explicit path (the teacher's extra layers change
    nothing but the time), so the step table compares like with like."""
    teacher, student = tiny_models()
    pair = DualViT(student, teacher, mode=mode, end_layer=-1, attention_impl='explicit').train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    masks = pair.draw_drop_path_masks(3, x.device)
    results = []
    for forward in (lambda: pair(x, drop_path_masks=masks), lambda: gpu_report.authors_forward(pair, x, masks)):
        pair.zero_grad(set_to_none=True)
        out = forward()
        logits, aux = out if isinstance(out, tuple) else (out, torch.zeros((), dtype=torch.float64))
        (logits.square().sum() + aux).backward()
        results.append((logits.detach(), aux.detach(), [p.grad.clone() for p in student.parameters()]))
    (la, aa, ga), (lb, ab, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aa, ab, rtol=1e-10, atol=1e-12)
    assert mode == 'copy' or aa > 0
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_mfu_counts_the_models_flops():
    """The teacher forward's FLOPs, as the step table counts them, against the ViT's matrix products written out."""
    spec = gpu_report.StepSpec(model='vit_base_patch16_224', kwargs=tuple(gpu_report.SMOKE_KWARGS.items()), size=32,
                               batch=2, task='teacher', path='explicit', device='cpu', amp='none', end_layer=-1,
                               drop_path=0.0, warmup=0, steps=1, count_flops=True)
    result = gpu_report.measure_step(spec)
    gpu_report.release_pairs()
    b, n, d, depth, p, classes = 2, 17, 48, 4, 8, 1000
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    expected = b * (depth * block + 2 * (n - 1) * d * 3 * p * p + 2 * d * classes)
    assert result.ok and result.flops == expected


@pytest.mark.slow
def test_isolated_measurement_reports_its_own_peak_memory():
    """On CPU an isolated measurement's memory is its own process's peak: the explicit maps' loss keeps
    several N x N tensors (4 x 4 x 1024 x 1024 float32: 64 MiB each), the library's formulation at most one
    at a time (its log-sum-exp pass), none for the backward."""
    if not sys.platform.startswith('linux'):
        pytest.skip('peak RSS in bytes from getrusage: Linux')
    os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')
    memory = {}
    for name in ('explicit maps', 'SDPA formulation (library)'):
        spec = gpu_report.LossSpec(formulation=name, batch=4, heads=4, tokens=1024, head_dim=16, device='cpu',
                                   warmup=0, steps=1)
        result = gpu_report.run_measurement(gpu_report.measure_loss, spec, isolate=True)
        assert result.ok and math.isfinite(result.value)
        memory[name] = gpu_report.step_memory(result)
    assert memory['explicit maps'] > 2 * 64 * 2 ** 20
    assert memory['SDPA formulation (library)'] < memory['explicit maps'] / 2
