"""Learning-rate schedules in iterations."""

import pytest

from distbelief.engine.config import TrainConfig
from distbelief.engine.schedule import ERROR_WINDOW, LRSchedule


def test_multistep():
    s = LRSchedule(TrainConfig(lr=0.1, milestones=(32000, 48000)))
    assert [s.lr_at(i) for i in (0, 31999)] == [0.1, 0.1]
    assert s.lr_at(32000) == pytest.approx(0.01) and s.lr_at(48000) == pytest.approx(0.001)


def test_linear_and_constant_warmup():
    lin = LRSchedule(TrainConfig(lr=0.1, warmup_iterations=10, warmup_lr=0.0,
                                 warmup_mode="linear"))
    assert [round(lin.lr_at(i), 6) for i in (0, 5, 10)] == [0.0, 0.05, 0.1]
    const = LRSchedule(TrainConfig(lr=0.1, warmup_iterations=10))
    assert const.lr_at(9) == pytest.approx(0.01) and const.lr_at(10) == 0.1


def test_resnet110_rule_waits_for_training_error_below_80_percent():
    s = LRSchedule(TrainConfig(lr=0.1, warmup_lr=0.01, warmup_until_error=0.8))
    for i in range(100):
        s.observe(i, 0.9)
    assert s.needs_error and s.lr_at(100) == 0.01
    for i in range(100, 100 + ERROR_WINDOW):
        s.observe(i, 0.5)
    # The 20-iteration mean crossed 0.8 within the window: warmup ends right after it.
    assert not s.needs_error and s.lr_at(s.warmup_ended_at) == 0.1
    assert s.lr_at(s.warmup_ended_at - 1) == 0.01
    restored = LRSchedule(TrainConfig(lr=0.1, warmup_lr=0.01, warmup_until_error=0.8))
    restored.load_state_dict(s.state_dict())
    assert restored.warmup_ended_at == s.warmup_ended_at and not restored.needs_error


def test_error_rule_bounded_by_warmup_iterations():
    s = LRSchedule(TrainConfig(lr=0.1, warmup_until_error=0.8, warmup_iterations=50))
    for i in range(50):
        s.observe(i, 1.0)
    assert s.warmup_ended_at == 50 and s.lr_at(50) == 0.1
