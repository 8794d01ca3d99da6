"""The demo's verdicts: paired per-seed differences and their 95% Student-t interval, checked against
hand-computed values and against the t distribution integrated numerically in float64."""
import math

import pytest

import demo


def t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """P(T <= x) for x >= 0: 0.5 plus Simpson's rule over the Student-t density on [0, x]."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    total = pdf(0.0) + pdf(x) + sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize('df', [1, 2, 3, 4, 5, 7, 10, 19, 30, 31, 40, 60, 120, 1000])
def test_t_quantiles_have_probability_975_below_them(df):
    # three decimals of the quantile move the probability by at most pdf(q) * 0.0005 < 2e-4
    assert t_cdf(demo.t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-4)


def test_t_quantiles_match_the_printed_tables():
    # standard tables (e.g. NIST/SEMATECH e-Handbook, 1.4.2.2.3): 2 seeds 12.706, 3 seeds 4.303, 5 seeds 2.776,
    # df 40: 2.021, df 60: 2.000, df 120: 1.980
    for df, value in {1: 12.706, 2: 4.303, 4: 2.776, 40: 2.021, 60: 2.000, 120: 1.980}.items():
        assert demo.t_quantile_975(df) == pytest.approx(value, abs=1e-3)
    with pytest.raises(ValueError):
        demo.t_quantile_975(0)


def test_paired_interval_by_hand():
    # differences 10, 11, 9: mean 10, sd 1; half width 4.303 * 1 / sqrt(3) = 2.48434
    p = demo.paired_interval([90.0, 92.0, 94.0], [80.0, 81.0, 85.0])
    assert p['diffs'] == pytest.approx([10.0, 11.0, 9.0])
    assert p['mean'] == pytest.approx(10.0)
    assert p['interval'] == pytest.approx((7.51566, 12.48434), abs=1e-5)
    # two seeds: differences 1 and 3, mean 2, sd sqrt(2); half width 12.706 * sqrt(2) / sqrt(2) = 12.706
    assert demo.paired_interval([5.0, 9.0], [4.0, 6.0])['interval'] == pytest.approx((-10.706, 14.706))
    assert demo.paired_interval([70.0], [60.0]) == {'diffs': [10.0], 'mean': 10.0, 'interval': None}
    with pytest.raises(ValueError):
        demo.paired_interval([1.0, 2.0], [1.0])


def test_a_gap_smaller_than_the_seed_noise_is_not_reproduced():
    # probe - random per seed: +4.0, -2.4, +2.6: mean +1.4, sd 3.3645, half width 4.303 * 3.3645 / sqrt(3) = 8.358
    acc = {demo.PROBE_SELECTION: [91.0, 87.5, 89.1], demo.RANDOM_SELECTION: [87.0, 89.9, 86.5]}
    claim = demo.Claim('probe beats random', demo.PROBE_SELECTION, demo.RANDOM_SELECTION)
    verdict, line = claim.judge(acc)
    assert verdict == 'NOT reproduced'
    assert '+4.0, -2.4, +2.6' in line and 'mean +1.4' in line and '[-7.0, +9.8]' in line
    # the same mean gap with little spread: +1.3, +1.5, +1.4 -> half width 4.303 * 0.1 / sqrt(3) = 0.248
    acc = {demo.PROBE_SELECTION: [91.3, 87.5, 89.4], demo.RANDOM_SELECTION: [90.0, 86.0, 88.0]}
    assert claim.judge(acc)[0] == 'reproduced'


def test_what_the_scale_changes_is_said_only_under_a_claim_that_fails():
    claim = demo.Claim('probe beats random', demo.PROBE_SELECTION, demo.RANDOM_SELECTION, scale_note='why')
    failed = {demo.PROBE_SELECTION: [91.0, 87.5, 89.1], demo.RANDOM_SELECTION: [87.0, 89.9, 86.5]}
    held = {demo.PROBE_SELECTION: [91.3, 87.5, 89.4], demo.RANDOM_SELECTION: [90.0, 86.0, 88.0]}
    assert claim.judge(failed)[1].endswith('\n  why') and 'why' not in claim.judge(held)[1]


def test_within_a_margin_needs_the_whole_interval_below_it():
    claim = demo.Claim('distill within 3 of fine-tuning', 'fine-tuning the teacher', 'attention distillation',
                       bound=3.0, below=True)
    # fine-tune - distill: 1, 2, 3: mean 2, sd 1, upper end 2 + 2.484 = 4.48 > 3
    acc = {'fine-tuning the teacher': [91.0, 92.0, 93.0], 'attention distillation': [90.0, 90.0, 90.0]}
    assert claim.judge(acc)[0] == 'NOT reproduced'
    # 1.9, 2.0, 2.1: mean 2, sd 0.1, upper end 2.248 < 3; and distillation better than fine-tuning also holds
    acc = {'fine-tuning the teacher': [91.9, 92.0, 92.1], 'attention distillation': [90.0, 90.0, 90.0]}
    assert claim.judge(acc)[0] == 'reproduced'
    acc = {'fine-tuning the teacher': [88.0, 89.0, 90.0], 'attention distillation': [90.0, 90.0, 90.0]}
    assert claim.judge(acc)[0] == 'reproduced'


def test_one_seed_is_not_judged():
    verdict, line = demo.CLAIMS[0].judge({'attention copy': [90.0], 'from scratch': [70.0]})
    assert verdict is None and 'not judged' in line and '+20.0' in line
