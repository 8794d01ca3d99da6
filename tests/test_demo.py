"""The demo's --quick path end to end on the real scikit-learn digits (about 4 minutes on 2 cores).

It checks that every method produced a finite accuracy and that the figures exist, not that the
papers' claims hold: that is what the README's table, from a full run, reports."""
import math
import os

import pytest

import demo

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_method_and_draws_the_figures(tmp_path):
    out = str(tmp_path / 'demo')
    result = demo.main(['--quick', '--output_dir', out])
    expected = {'teacher (pre-training split)', 'from scratch', 'attention copy', 'attention distillation',
                'fine-tuning the teacher', 'probe distillation, attention-probe selection',
                'probe distillation, random selection'}
    assert set(result['accuracy']) == expected
    for method, values in result['accuracy'].items():
        assert len(values) == 1 and math.isfinite(values[0]) and 0.0 <= values[0] <= 100.0, method
    for kind in ('probe', 'random'):
        assert 0.0 <= result['fractions'][kind][0] <= 100.0
    for path in result['figures'].values():
        assert os.path.getsize(path) > 1000, path
    table = open(os.path.join(out, 'results.md')).read()
    assert '| from scratch |' in table and 'Claims:' in table
