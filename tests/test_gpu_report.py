"""The benchmarks: benchmarks/gpu_report.py's --smoke run (every part on CPU, so the script is known to work
before a GPU sees it; on a machine with a GPU its CUDA tests run and must pass), its --output checks, and what
the tables rest on: the authors' approach (benchmarks/baseline.py) computing the same model and loss as the
library's explicit path, the loss formulations against a float64 formula, the FLOP count behind MFU, the
step table's arithmetic (benchmarks/bench_step.py) and the peak memory of an isolated measurement."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY_ARCH, make_unwritable, make_writable

from benchmarks import baseline, bench_step, gpu_report
from models_dual_vit import DualViT
from models_pairing import resolve_pairing
from models_vit import create_vit
from util.errors import UserError

PYTEST_LINE = re.compile(r'^tests/test_cuda\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b')


def explicit_ce64(q_s, k_s, q_t, k_t, scale_s, scale_t):
    s = (q_s.double() @ k_s.double().transpose(-1, -2)) * scale_s
    t = (q_t.double() @ k_t.double().transpose(-1, -2)) * scale_t
    return -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()


def section(report: str, title: str) -> str:
    return report.split(f'## {title}\n', 1)[1].split('\n## ', 1)[0]


def table(text: str) -> list[list[str]]:
    """The data rows of the first markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith('|')]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]


@pytest.mark.slow
def test_smoke_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / 'missing' / 'folder' / 'report.md'  # the folder is created
    proc = subprocess.run([sys.executable, os.path.join('benchmarks', 'gpu_report.py'), '--smoke', '--output',
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert f"- torch {torch.__version__}" in report and '- command: `python benchmarks/gpu_report.py --smoke' in report

    # pytest's own lines: every CUDA test skipped without a GPU, passed or skipped with one, never failed
    tests = section(report, 'CUDA tests')
    outcomes = [m.groups() for m in map(PYTEST_LINE.match, tests.splitlines()) if m]
    assert len(outcomes) >= 10, tests
    if torch.cuda.is_available():
        assert all(outcome in ('PASSED', 'SKIPPED') for _, outcome in outcomes), tests
        assert '(exit 0)' in tests.strip().splitlines()[0], tests
    else:
        assert all(outcome == 'SKIPPED' for _, outcome in outcomes) and 'needs a CUDA GPU' in tests, tests
        assert f'(exit 0): {len(outcomes)} skipped in ' in tests.strip().splitlines()[0], tests

    steps = section(report, 'Step table')  # 2 sizes x 4 tasks x 3 paths, each with a speed and an MFU
    rows = table(steps)
    assert len(rows) == 2 * 4 * 3
    assert {row[4] for row in rows} == set(bench_step.PATH_NAMES.values())
    for row in rows:
        assert float(row[5]) > 0 and float(row[6]) > 0 and re.fullmatch(r"\d+\.\d%", row[10]), row
    assert len(re.findall(r'^- .*, (32|64) px: copy fused ', steps, re.M)) == 2

    losses = table(section(report, 'The distillation loss alone'))  # 2 token counts x 3 formulations, equal values
    assert len(losses) == 6 and {row[1] for row in losses} == set(bench_step.LOSS_NAMES.values())
    assert all(float(row[2]) > 0 and abs(float(row[6])) < 1e-5 for row in losses)

    teacher = table(section(report, 'Teacher held in bf16'))
    assert [row[0] for row in teacher] == ['float32', 'bf16']

    loader = table(section(report, 'Loader against step'))
    assert [row[0] for row in loader] == ['32', '64'] and all(float(row[1]) > 0 and float(row[3]) > 0
                                                               for row in loader)


@pytest.mark.parametrize('case', ['under a file', 'a folder', 'unwritable', 'under an unwritable folder'])
def test_bad_output_is_refused_before_any_measurement(tmp_path, monkeypatch, case):
    (tmp_path / 'file').write_text('kept')
    output = {'under a file': tmp_path / 'file' / 'sub' / 'report.md', 'a folder': tmp_path,
              'unwritable': tmp_path / 'ro' / 'report.md',
              'under an unwritable folder': tmp_path / 'ro' / 'sub' / 'report.md'}[case]
    if 'unwritable' in case and not make_unwritable(tmp_path / 'ro'):
        pytest.skip('no way to make a folder unwritable here')

    def measured(*args, **kwargs):
        raise AssertionError('a measurement started before the output was checked')
    for name in ('run_tests', 'run_loader', 'machine_lines'):
        monkeypatch.setattr(gpu_report, name, measured)
    monkeypatch.setattr(bench_step, 'run_steps', measured)
    monkeypatch.setattr(bench_step, 'run_loss', measured)
    try:
        with pytest.raises(UserError, match=r"^--output .*(is a file, not a folder|is a folder|cannot write in|"
                                            r"cannot create the folder)"):
            gpu_report.main(gpu_report.get_args(['--smoke', '--output', str(output)]))
    finally:
        if 'unwritable' in case:
            make_writable(tmp_path / 'ro')
    assert (tmp_path / 'file').read_text() == 'kept'
    assert sorted(os.listdir(tmp_path)) == (['file', 'ro'] if 'unwritable' in case else ['file'])
    if 'unwritable' in case:
        assert os.listdir(tmp_path / 'ro') == []


def test_missing_output_folder_is_created(tmp_path):
    output = tmp_path / 'a' / 'b' / 'report.md'
    gpu_report.check_output(str(output))
    assert os.listdir(tmp_path / 'a' / 'b') == []  # created, and the probe removed


@pytest.mark.slow
def test_bad_output_is_one_error_line(tmp_path):
    (tmp_path / 'file').write_text('kept')
    proc = subprocess.run([sys.executable, os.path.join('benchmarks', 'gpu_report.py'), '--smoke', '--output',
                           str(tmp_path / 'file' / 'report.md')], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr.splitlines() == [f"error: --output {tmp_path / 'file' / 'report.md'}: {tmp_path / 'file'} "
                                        "is a file, not a folder; give a path in a folder"]


@pytest.mark.parametrize('path', list(bench_step.LOSSES))
@pytest.mark.parametrize('n', [17, 37])
def test_loss_formulations_equal_the_formula_float64(path, n):
    """The loss table's three formulations (the library's through SDPA, its explicit maps, the authors'), value
    and student gradients, against the formula written out in float64."""
    g = torch.Generator().manual_seed(n)
    q_s, k_s = (torch.randn(2, 3, n, 8, dtype=torch.float64, generator=g) * 2 for _ in range(2))
    q_t, k_t = (torch.randn(2, 3, n, 16, dtype=torch.float64, generator=g) * 2 for _ in range(2))
    inputs = [q_s.clone().requires_grad_(True), k_s.clone().requires_grad_(True), q_t, k_t]
    ref_inputs = [q_s.clone().requires_grad_(True), k_s.clone().requires_grad_(True), q_t, k_t]
    loss = bench_step.LOSSES[path](*inputs, 8 ** -0.5, 16 ** -0.5)
    ref = explicit_ce64(*ref_inputs, 8 ** -0.5, 16 ** -0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(loss, inputs[:2]), torch.autograd.grad(ref, ref_inputs[:2])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


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
    pairs, layers = resolve_pairing(len(student.blocks), len(teacher.blocks), end_layer=-1)
    pair = DualViT(student, teacher, mode=mode, pairs=pairs, layers=layers, attention_impl='explicit').train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    masks = pair.draw_drop_path_masks(3, x.device)
    results = []
    for forward in (lambda: pair(x, drop_path_masks=masks), lambda: baseline.authors_forward(pair, x, masks)):
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
    spec = bench_step.StepSpec(model='vit_base_patch16_224', kwargs=tuple(gpu_report.SMOKE_KWARGS.items()), size=32,
                               batch=2, task='teacher', path='explicit', device='cpu', amp='none', end_layer=-1,
                               drop_path=0.0, warmup=0, steps=1, count_flops=True)
    result = bench_step.measure_step(spec)
    bench_step.release_pairs()
    b, n, d, depth, p, classes = 2, 17, 48, 4, 8, 1000
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    expected = b * (depth * block + 2 * (n - 1) * d * 3 * p * p + 2 * d * classes)
    assert result.ok and result.flops == expected


def test_step_table_and_transfer_cost(capsys):
    """bench_step.py's own command line: one row per task and path, and t(step) / (t(teacher) + t(plain)) from
    the rows' times."""
    args = bench_step.get_args(['--models', 'vit_base_patch16_224', '--model_kwargs',
                                *[f'{k}={v}' for k, v in gpu_report.SMOKE_KWARGS.items()], '--sizes', '32',
                                '--batch_size', '2', '--warmup', '0', '--steps', '1', '--matmul_size', '64',
                                '--paths', 'fused', 'explicit', '--end_layer', '-1', '--device', 'cpu'])
    results = bench_step.main(args)
    out = capsys.readouterr().out
    rows = table(out)
    assert [(row[3], row[4]) for row in rows] == [(bench_step.TASK_NAMES[t], bench_step.PATH_NAMES[p])
                                                  for t in bench_step.TASKS for p in ('fused', 'explicit')]
    seconds = {(spec.task, spec.path): r.seconds for spec, r in next(iter(results.values()))}
    base = seconds['teacher', 'fused'] + seconds['plain', 'fused']
    line = re.search(r'^- .*, 32 px: (.*)$', out, re.M).group(1)
    assert line == ', '.join(f"{t} {p} {seconds[t, p] / base:.3f}" for t in ('copy', 'distill')
                             for p in ('fused', 'explicit'))
    shown = {(bench_step.TASK_NAMES[t], bench_step.PATH_NAMES[p]): f"{s * 1e3:.1f}" for (t, p), s in seconds.items()}
    assert [row[5] for row in rows] == [shown[row[3], row[4]] for row in rows]


@pytest.mark.slow
def test_isolated_measurement_reports_its_own_peak_memory():
    """On CPU an isolated measurement's memory is its own process's peak: the explicit maps' loss keeps
    several N x N tensors (4 x 4 x 1024 x 1024 float32: 64 MiB each), the library's formulation at most one
    at a time (its log-sum-exp pass), none for the backward."""
    if not sys.platform.startswith('linux'):
        pytest.skip('peak RSS in bytes from getrusage: Linux')
    os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')
    memory = {}
    for path in ('explicit', 'fused'):
        spec = bench_step.LossSpec(path=path, batch=4, heads=4, tokens=1024, head_dim=16, device='cpu',
                                   warmup=0, steps=1)
        result = bench_step.run_measurement(bench_step.measure_loss, spec, isolate=True)
        assert result.ok and math.isfinite(result.value)
        memory[path] = bench_step.step_memory(result)
    assert memory['explicit'] > 2 * 64 * 2 ** 20
    assert memory['fused'] < memory['explicit'] / 2


@pytest.mark.parametrize('amp,dtype', [('none', torch.float32), ('bf16', torch.bfloat16)])
def test_mfu_is_measured_against_the_steps_own_precision(monkeypatch, amp, dtype):
    """A CPU step without autocast runs in float32: its MFU denominator is the float32 matrix-product rate (a bf16
    rate, emulated on a CPU without bf16 units, made MFU read 5,000%)."""
    used = []
    monkeypatch.setattr(bench_step, 'matmul_rate', lambda *a, dtype=None, **k: used.append(dtype) or 1e9)
    args = bench_step.get_args(['--models', 'vit_base_patch16_224', '--model_kwargs',
                                *[f'{k}={v}' for k, v in gpu_report.SMOKE_KWARGS.items()], '--sizes', '32',
                                '--batch_size', '2', '--warmup', '0', '--steps', '1', '--paths', 'fused',
                                '--tasks', 'plain', '--device', 'cpu', '--amp', amp])
    bench_step.main(args)
    assert used == [dtype]


def test_teacher_rows_hold_the_teacher_as_they_say(monkeypatch):
    """The teacher part: a distill step with the teacher in float32 and one in bf16 (which needs --amp bf16), and
    the teacher's weight bytes of each row from the parameters the measured step's teacher holds."""
    kwargs = [f'{k}={v}' for k, v in gpu_report.SMOKE_KWARGS.items()]
    held = []
    hold = bench_step.hold_teacher

    def recording(teacher, dtype):
        line = hold(teacher, dtype)
        held.append((dtype, {p.dtype for p in teacher.parameters()}, bench_step.parameter_bytes(teacher)))
        return line

    monkeypatch.setattr(bench_step, 'hold_teacher', recording)
    for amp, expected in (('bf16', {'float32': torch.float32, 'bf16': torch.bfloat16}), ('none', None)):
        held.clear()
        args = bench_step.get_args(['--models', 'vit_base_patch16_224', '--model_kwargs', *kwargs, '--sizes', '32',
                                    '--batch_size', '2', '--warmup', '0', '--steps', '1', '--device', 'cpu',
                                    '--amp', amp])
        rows = table('\n'.join(bench_step.run_teacher_dtype(args, bench_step.Deadline())))
        assert [row[0] for row in rows] == ['float32', 'bf16']
        if expected is None:
            assert rows[1][1] == 'needs --amp bf16'
            continue
        assert all(float(row[1]) > 0 for row in rows)
        assert {d: types for d, types, _ in held} == {d: {t} for d, t in expected.items()}
        measured = {d: b for d, _, b in held}  # the measured pair's teacher, and the one the column counts
        assert measured['bf16'] * 2 == measured['float32']
        assert [row[3] for row in rows] == [f"{measured[d] / 2**20:.1f}" for d in ('float32', 'bf16')]
