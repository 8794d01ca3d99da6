"""The demo end to end on the real scikit-learn digits, two seeds with every budget cut to a few
epochs: the runs in worker processes, each seed on its own split with its own teacher, the paired
verdicts, the table and the figures. Whether the papers' claims hold at the demo's real budgets is
what the README's table, from a full run, reports."""
import math
import os
import subprocess

import pytest

import demo
from util.errors import run_cli

TINY_RECIPE = {**demo.RECIPE, 'student_epochs': 2, 'distill_epochs': 3,
               'mae_args': ['--epochs', '2', '--warmup_epochs', '1', '--decoder_embed_dim', '16',
                            '--decoder_depth', '1', '--decoder_num_heads', '2']}
METHODS = {demo.MAE_TEACHER, 'from scratch', 'attention copy', 'attention distillation', demo.FINETUNED,
           demo.PROBE_SELECTION, demo.RANDOM_SELECTION}


@pytest.fixture
def tiny_budgets(monkeypatch):
    monkeypatch.setattr(demo, 'RECIPE', TINY_RECIPE)
    monkeypatch.setattr(demo, 'PROBE_PRESENTATIONS', {'full': 1200, 'quick': 800})
    monkeypatch.setattr(demo, 'WILD_DISTRACTORS', 600)


@pytest.mark.slow
def test_two_seeds_give_paired_verdicts_table_and_figures(tmp_path, tiny_budgets):
    out = str(tmp_path / 'demo')
    result = demo.main(['--seeds', '2', '--output_dir', out])
    assert set(result['accuracy']) == METHODS
    for method, values in result['accuracy'].items():
        if method == demo.MAE_TEACHER:  # no classifier: no accuracy
            assert values == [None, None]
            continue
        assert len(values) == 2 and all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values), method
    for method in (demo.PROBE_SELECTION, demo.RANDOM_SELECTION):
        assert len(result['fractions'][method]) == 2 and all(0.0 <= f <= 100.0 for f in result['fractions'][method])
    # every claim judged on both seeds' differences, with its interval
    assert all(v in ('reproduced', 'NOT reproduced') for v in result['verdicts'])
    assert len(result['claims']) == len(demo.CLAIMS) and all('95% interval' in c for c in result['claims'])
    # each seed its own data split and teacher
    small = [sorted(os.listdir(os.path.join(out, 'data', f'split{s}', 'small', 'train', '3'))) for s in (0, 1)]
    assert small[0] != small[1]
    for s in (0, 1):
        assert os.path.exists(os.path.join(out, 'runs', f'seed{s}_mae_teacher', 'checkpoint.pth'))
    for path in result['figures'].values():
        assert os.path.getsize(path) > 1000, path
    table = open(os.path.join(out, 'results.md')).read()
    assert table.startswith('Command: python demo.py --seeds 2\n')
    assert '| from scratch |' in table and 'Total wall time' in table
    assert all(c in table for c in result['claims'])


def test_the_students_learn_from_the_mae_teacher_and_the_probe_students_from_its_fine_tuned_form(tmp_path):
    jobs = {job.method: job for job in demo.seed_jobs(str(tmp_path), 7, demo.RECIPE, 8000, False)}
    mae, finetuned = (os.path.join(str(tmp_path), 'runs', f'seed7_{n}', 'checkpoint.pth')
                      for n in ('mae_teacher', 'finetune'))
    assert jobs[demo.MAE_TEACHER].pretrain and not jobs[demo.MAE_TEACHER].after
    assert '--nb_classes' not in jobs[demo.MAE_TEACHER].argv  # main_pretrain.py: no labels
    for method in ('attention copy', 'attention distillation', demo.FINETUNED):
        argv = jobs[method].argv
        assert argv[argv.index('--finetune') + 1] == mae and jobs[method].after == 'seed7_mae_teacher', method
    assert '--cls_token' in jobs[demo.FINETUNED].argv  # the token the attention probe reads
    assert '--finetune' not in jobs['from scratch'].argv and not jobs['from scratch'].after
    for method in (demo.PROBE_SELECTION, demo.RANDOM_SELECTION):
        argv, select = jobs[method].argv, jobs[method].select_argv
        assert argv[argv.index('--finetune') + 1] == finetuned == select[select.index('--teacher') + 1]
        assert jobs[method].after == 'seed7_finetune'


def test_the_wild_set_is_mostly_not_digits(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, 'WILD_DISTRACTORS', 120)
    info = demo.prepare_data(str(tmp_path / 'split3'), 3)
    kinds = list(info['wild_members'].values())
    assert kinds.count('digit') == 400 and len(kinds) == 520
    assert {k: kinds.count(k) for k in demo.DISTRACTOR_KINDS} == {k: 20 for k in demo.DISTRACTOR_KINDS}
    assert sorted(os.listdir(tmp_path / 'split3' / 'wild')) == sorted(info['wild_members'])
    # a different wild set asked of the same folder is written anew, not taken from the earlier one
    monkeypatch.setattr(demo, 'WILD_DISTRACTORS', 60)
    assert len(demo.prepare_data(str(tmp_path / 'split3'), 3)['wild_members']) == 460
    assert len(os.listdir(tmp_path / 'split3' / 'wild')) == 460


def test_quick_is_one_seed_with_the_short_probe_budget_and_bad_counts_are_refused():
    a, seeds, presentations = demo.parse([])
    assert seeds == [0, 1, 2, 3] and presentations == demo.PROBE_PRESENTATIONS['full'] and a.workers >= 1
    assert demo.parse(['--quick'])[1:] == ([0], demo.PROBE_PRESENTATIONS['quick'])
    assert demo.parse(['--seeds', '5', '--first_seed', '100'])[1] == [100, 101, 102, 103, 104]
    for argv in (['--seeds', '0'], ['--workers', '0']):
        with pytest.raises(demo.UserError, match='at least 1'):
            demo.parse(argv)


# ---- the output folder: the demo removes only what it made ------------------------------------------------
def test_demo_never_removes_a_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'project'
    experiment = out / 'runs' / 'my_experiment'  # e.g. SummaryWriter's default folder in a project
    experiment.mkdir(parents=True)
    (experiment / 'events.out.tfevents.1').write_bytes(b'a user experiment')
    monkeypatch.setattr(demo, 'seed_jobs', lambda *a, **k: pytest.fail('the demo started its runs'))
    with pytest.raises(SystemExit) as end:
        run_cli(demo.main, ['--quick', '--output_dir', str(out)])
    assert end.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {str(out)!r} holds files the demo did not "
                                               "write (runs)") and 'another --output_dir' in err[0]
    assert (experiment / 'events.out.tfevents.1').read_bytes() == b'a user experiment'
    assert sorted(os.listdir(out)) == ['runs']


def test_demo_accepts_a_new_or_empty_folder_and_its_own_again(tmp_path):
    new, empty = tmp_path / 'new' / 'demo', tmp_path / 'empty'
    empty.mkdir()
    for out in (new, empty):
        demo.claim_output_folder(str(out))
        assert os.listdir(out) == [demo.MARKER]
        (out / 'runs').mkdir()
        (out / 'runs' / 'seed0_teacher.log').write_text('an earlier demo run')
        demo.claim_output_folder(str(out))  # a rerun into the demo's own folder (which replaces its runs/)


def test_demo_into_an_unwritable_folder_is_one_error_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'locked'
    out.mkdir()
    if subprocess.run(['chattr', '+i', str(out)], capture_output=True).returncode:
        if os.geteuid() == 0:
            pytest.skip('chattr +i is not supported here')
        out.chmod(0o555)
    monkeypatch.setattr(demo, 'seed_jobs', lambda *a, **k: pytest.fail('the demo started its runs'))
    try:
        with pytest.raises(SystemExit) as end:
            run_cli(demo.main, ['--quick', '--output_dir', str(out)])
    finally:
        subprocess.run(['chattr', '-i', str(out)], capture_output=True)
        out.chmod(0o755)
    assert end.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {str(out)!r} cannot be written")


def test_a_negative_first_seed_is_one_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, 'seed_jobs', lambda *a, **k: pytest.fail('the demo started its runs'))
    with pytest.raises(SystemExit) as end:
        run_cli(demo.main, ['--quick', '--first_seed', '-1', '--output_dir', str(tmp_path / 'demo')])
    assert end.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --first_seed -1: must be 0 or more")
    assert not (tmp_path / 'demo').exists()


def test_a_rerun_removes_only_what_the_demo_wrote_under_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'demo'
    demo.claim_output_folder(str(out))
    (out / 'runs' / 'seed0_scratch').mkdir(parents=True)  # an earlier demo's run
    (out / 'runs' / 'seed0_scratch' / 'checkpoint.pth').write_bytes(b'the demo run')
    (out / 'runs' / 'seed0_scratch.log').write_text('its log')
    (out / 'runs' / 'my_model.pth').write_bytes(b'a checkpoint of the user')
    monkeypatch.setattr(demo, 'run_jobs', lambda *a, **k: pytest.fail('the demo started its runs'))
    with pytest.raises(SystemExit) as end:
        run_cli(demo.main, ['--quick', '--output_dir', str(out)])
    assert end.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {str(out)!r}: {out / 'runs' / 'my_model.pth'} "
                                               "was not written by the demo")
    assert (out / 'runs' / 'my_model.pth').read_bytes() == b'a checkpoint of the user'
    assert (out / 'runs' / 'seed0_scratch' / 'checkpoint.pth').exists()  # nothing removed before the refusal
    (out / 'runs' / 'my_model.pth').unlink()
    jobs = demo.seed_jobs(str(out), 0, demo.RECIPE, 800, True)
    demo.clear_runs(str(out), jobs)
    assert os.listdir(out / 'runs') == []  # the demo's own runs, removed
    (out / 'runs' / 'seed0_scratch.log').write_text('a run of this demo')
    (out / 'runs' / 'seed0_selection_probe.pth.x1y2.tmp').write_text('a killed write of this demo')
    (out / 'runs' / 'notes.txt').write_text('the user')
    with pytest.raises(demo.UserError, match='notes.txt was not written by the demo'):
        demo.clear_runs(str(out), jobs)
    (out / 'runs' / 'notes.txt').unlink()
    demo.clear_runs(str(out), demo.seed_jobs(str(out), 5, demo.RECIPE, 800, True))  # by what the last demo recorded
    assert os.listdir(out / 'runs') == []
