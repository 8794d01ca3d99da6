"""Write docs/FAMILIES.md from the results of tests/test_families.py, and the refusals from check_supported.

    python tools/families_table.py            # runs the tests (slow ones included), then writes the table

Each cell is the outcome of the test that checks it (pass / FAIL / not run), so the table can only list a
family as working when its test passed on this machine.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

COLUMNS = (  # (header, test function, parameter suffix)
    ('maps = timm', 'test_teacher_maps_and_logits_are_timms', ''),
    ('distill fused', 'test_distill_loss_and_student_gradients_are_timms', '-fused'),
    ('distill explicit', 'test_distill_loss_and_student_gradients_are_timms', '-explicit'),
    ('copy fused', 'test_copy_uses_the_teachers_maps_as_timm_computes_them', '-fused'),
    ('copy explicit', 'test_copy_uses_the_teachers_maps_as_timm_computes_them', '-explicit'),
    ('main_finetune copy step', 'test_one_training_step_through_main_finetune', '-copy'),
    ('main_finetune distill step', 'test_one_training_step_through_main_finetune', '-distill'),
    ('copy_q/k/v, distill_q/k/v', 'test_qkv_modes_move_timms_own_q_k_v',
     tuple(f'-{m}_{w}' for m in ('copy', 'distill') for w in 'qkv')),
    ('unused parameters announced (DDP)', 'test_unused_student_parameters_are_announced_for_ddp',
     ('-copy', '-copy_q', '-distill')),
)
HEAD_COLUMNS = (
    ('teacher at --nb_classes 10', 'test_teacher_with_its_own_head_loads_for_another_class_count'),
    ('--eval reads its head', 'test_eval_of_a_classifier_reads_its_own_head'),
)
# models check_supported refuses, with the timm arguments of a tiny one
REFUSED = (
    ('ResPostBlock (post-norm ViT, vit_*_rpn_*)', 'vit_base_patch16_rpn_224', {}),
    ('EvaBlockPostNorm (EVA-01 giant)', 'eva_giant_patch14_224', dict(use_post_norm=True)),
    ('ParallelThingsBlock (vit_*_18x2_*)', 'vit_small_patch16_18x2_224', {}),
)


def run_tests(path: str = 'tests/test_families.py') -> dict[str, str]:
    """Outcome per test id of the test file ``path``: 'pass', 'FAIL' or 'skipped'."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, 'results.xml')
        subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={xml}',
                        path], cwd=ROOT, check=False)
        outcomes = {}
        for case in ET.parse(xml).getroot().iter('testcase'):
            failed = case.find('failure') is not None or case.find('error') is not None
            outcomes[case.get('name')] = 'FAIL' if failed else 'skipped' if case.find('skipped') is not None else 'pass'
        return outcomes


def cell(outcomes: dict, test: str, param: str) -> str:
    return outcomes.get(f'{test}[{param}]', 'not run')


def cells(outcomes: dict, test: str, family: str, suffixes) -> str:
    """One cell for a family's test over one or more parameter suffixes: 'pass' only when all passed."""
    results = [cell(outcomes, test, family + suffix) for suffix in
               ((suffixes,) if isinstance(suffixes, str) else suffixes)]
    return results[0] if len(set(results)) == 1 else ', '.join(results)


def refusal(name: str, kwargs: dict) -> str:
    import timm

    from models_vit import check_supported
    from util.errors import UserError
    model = timm.create_model(name, pretrained=False, depth=1, embed_dim=48, num_heads=3, **kwargs)
    try:
        check_supported(model, 'teacher')
    except UserError as e:
        return re.sub(r'\s+', ' ', str(e)).split(' Pick ')[0]
    return 'accepted (not refused)'


def main() -> None:
    import torch
    from test_families import FAMILIES, HEADS

    from models_families import family_of_model
    outcomes = run_tests()
    lines = ['# Teacher families', '',
             'Which timm ViT families attention transfer runs, as teacher and as the student that mirrors it. Each',
             'cell is the outcome of a test of `tests/test_families.py` (a tiny model with random weights, saved in',
             "timm's state-dict layout): maps, transfer loss and the student's gradients compared with timm's own",
             'attention modules run unfused (q, k and v: those timm hands to SDPA), and one epoch through',
             '`main_finetune.py`. Plain ViTs (ViT, DeiT, MAE, DINO, DINOv2, CLIP) are covered by',
             '`tests/test_transfer_model.py`. Teachers by `timm:` name are not tested here (no downloads).', '',
             f'Command: `python tools/families_table.py`. Machine: {platform.machine()} CPU, {platform.system()}, '
             f'torch {torch.__version__}. Date: {datetime.date.today().isoformat()}.', '',
             '| family (test) | timm class | example | ' + ' | '.join(c[0] for c in COLUMNS) + ' |',
             '|' + '---|' * (3 + len(COLUMNS))]
    import timm
    for family, (name, kwargs) in FAMILIES.items():
        model = timm.create_model(name, pretrained=False, num_classes=3, img_size=32, **kwargs)
        row = [cells(outcomes, test, family, suffixes) for _, test, suffixes in COLUMNS]
        lines.append(f'| {family} | {type(model).__name__} ({family_of_model(model).name} adapter) | `{name}` | '
                     + ' | '.join(row) + ' |')
    lines += ['', '## Classifier-side heads', '',
              '| family (test) | example | ' + ' | '.join(c[0] for c in HEAD_COLUMNS) + ' |',
              '|' + '---|' * (2 + len(HEAD_COLUMNS))]
    for family, (name, _) in HEADS.items():
        lines.append(f'| {family} | `{name}` | ' + ' | '.join(cell(outcomes, t, family) for _, t in HEAD_COLUMNS)
                     + ' |')
    pairs = [outcomes.get(k, 'not run') for k in outcomes if k.startswith('test_layer_map_pairs_are_the_maps')]
    lines += ['', '## A student shallower than its teacher', '',
              f"`--layer_map` (2-block student of a 4-block ViT teacher; default, `0:0,1:2`, `1:2`; fused and "
              f"explicit; copy and distill): {'pass' if pairs and set(pairs) == {'pass'} else ', '.join(pairs)}."]
    lines += ['', '## Refused', '', '| blocks | example | message |', '|---|---|---|']
    for label, name, kwargs in REFUSED:
        lines.append(f'| {label} | `{name}` | {refusal(name, kwargs)} |')
    with open(os.path.join(ROOT, 'docs', 'FAMILIES.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
