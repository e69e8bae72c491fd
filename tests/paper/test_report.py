"""Numbers over seeds and the marks of the paper's claims: mean, sample std, best, and the
comparison of means with their spread."""

import math

import pytest

from distbelief.paper.report import Check, Report, Stat, below


def test_stat_is_the_mean_the_sample_std_and_the_lowest_run():
    stat = Stat((1.0, 2.0, 6.0))
    assert stat.mean == 3.0 and stat.best == 1.0
    assert stat.std == pytest.approx(math.sqrt(((1 - 3) ** 2 + 1 + 9) / 2))  # n - 1
    assert stat.text() == "3.00 +- 2.65"
    one = Stat((0.5,))
    assert (one.std, one.best, one.text("{:.3f}")) == (0.0, 0.5, "0.500")


def test_a_strict_claim_holds_on_the_means_and_is_separated_beyond_both_stds():
    low, high = Stat((1.0, 3.0)), Stat((5.0, 7.0))  # stds 1.41 each: gap 4 > 2.83
    check = below("low below high", low, high)
    assert (check.holds, check.separated, check.mark) == (True, True, "holds")
    near = Stat((3.5, 5.5))  # gap 2.5 < 2.83: ordered, not separated
    check = below("low below near", low, near)
    assert (check.holds, check.separated) == (True, False)
    assert check.mark == "holds, within the spread"
    wrong = below("high below low", high, low)
    assert (wrong.holds, wrong.mark) == (False, "does NOT hold")
    assert wrong.detail == "6.00 +- 1.41 vs 2.00 +- 1.41"
    # One run each: no spread to judge, the mark is the means' alone.
    single = below("a below b", Stat((1.0,)), Stat((2.0,)))
    assert (single.holds, single.separated, single.mark) == (True, None, "holds")
    assert not below("tie", Stat((2.0,)), Stat((2.0,))).holds


def test_at_least_as_well_tolerates_a_tie_within_the_noise_only():
    a, b = Stat((0.2, 0.4)), Stat((0.1, 0.3))  # a's mean above b's by 0.1 < 0.28
    check = below("a at least as well as b", a, b, or_equal=True)
    assert (check.holds, check.separated, check.mark) == (True, False,
                                                          "holds, within the spread")
    assert below("b at least as well as a", b, a, or_equal=True).mark == "holds"
    far = Stat((5.0, 5.2))
    assert not below("far at least as well as b", far, b, or_equal=True).holds


def test_the_report_writes_each_claims_mark(tmp_path):
    report = Report("T", "note", checks=[Check("x", True, "d", False), Check("y", False)])
    text = report.markdown()
    assert "- holds, within the spread: x (d)" in text and "- does NOT hold: y" in text
    assert [c["mark"] for c in report.check_dicts()] == ["holds, within the spread",
                                                         "does NOT hold"]


def test_fig6s_claims_name_the_nets_in_their_order_and_check_every_deeper_resnet():
    from distbelief.paper.experiments import _degradation_checks

    train = {"plain20": Stat((1.0,)), "plain56": Stat((50.0,)), "resnet20": Stat((0.5,)),
             "resnet56": Stat((0.4,)), "resnet110": Stat((0.9,))}
    checks = {c.claim: c for c in _degradation_checks(train)}
    degradation = checks["degradation: the deeper plain net trains worse (plain56 above "
                         "plain20)"]
    assert degradation.holds and degradation.detail == "50.00% vs 1.00%"
    assert checks["resnet20 trains better than plain20"].holds
    assert checks["resnet56 trains better than plain56"].holds
    assert checks["deeper: resnet56 trains at least as well as resnet20"].holds
    assert not checks["deeper: resnet110 trains at least as well as resnet20"].holds
    assert len(checks) == 5
    flat = _degradation_checks({**train, "plain56": Stat((0.5,))})
    assert not flat[0].holds  # a deeper plain net that trains as well is no degradation
