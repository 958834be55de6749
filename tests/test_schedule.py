"""csrv2.schedule.k_at_step and csrv2.config.resolve_k_init on hand-worked values."""

from __future__ import annotations

import pytest

from csrv2.config import TrainConfig, resolve_k_init
from csrv2.schedule import k_at_step


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 64),  # p = 0
        (35, 33),  # p = 35 / 70 = 0.5: round(0.5 * 64 + 0.5 * 2) = 33
        (7, 58),  # p = 0.1: round(0.9 * 64 + 0.1 * 2) = round(57.8) = 58
        (69, 3),  # p = 69/70: (64 + 69 * 2) / 70 = 202 / 70 = 2.886 -> 3
        (70, 2),  # p = 1: decay over
        (71, 2),
        (99, 2),
        (100, 2),
        (1000, 2),
    ],
)
def test_k_at_step_by_hand(step, expected):
    assert k_at_step(step, total_steps=100, k_init=64, k_final=2, decay_ratio=0.7) == expected


def test_k_at_step_default_decay_ratio_is_0_7():
    assert k_at_step(35, 100, 64, 2) == 33
    assert k_at_step(70, 100, 64, 2) == 2


def test_k_at_step_other_decay_ratio_by_hand():
    # decay over 0.5 * 40 = 20 steps; step 5: p = 0.25 -> round(0.75 * 16 + 0.25 * 4) = 13
    assert k_at_step(5, 40, 16, 4, decay_ratio=0.5) == 13
    assert k_at_step(20, 40, 16, 4, decay_ratio=0.5) == 4
    # decay_ratio 1: k reaches k_final only at the last step
    assert k_at_step(9, 10, 12, 2, decay_ratio=1.0) == 3  # round(0.1 * 12 + 0.9 * 2) = 3


@pytest.mark.parametrize("k", [1, 2, 8])
def test_k_at_step_fixed_when_k_init_equals_k(k):
    assert {k_at_step(s, 50, k, k) for s in range(60)} == {k}


@pytest.mark.parametrize("total, k_init, k_final, ratio", [(100, 64, 2, 0.7), (13, 16, 1, 0.7), (1000, 64, 4, 0.3), (7, 5, 2, 1.0)])
def test_k_at_step_monotone_non_increasing_within_bounds(total, k_init, k_final, ratio):
    ks = [k_at_step(s, total, k_init, k_final, ratio) for s in range(total + 5)]
    assert ks[0] == k_init
    assert ks[-1] == k_final
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert all(k_final <= k <= k_init for k in ks)


# --- resolve_k_init -----------------------------------------------------------------------------


def test_resolve_k_init_default_is_64():
    assert resolve_k_init(None, 2, 1024) == 64


def test_resolve_k_init_default_capped_at_quarter_hidden_dim():
    assert resolve_k_init(None, 2, 128) == 32  # 128 // 4
    assert resolve_k_init(None, 2, 130) == 32  # floor
    assert resolve_k_init(None, 1, 3) == 1  # 3 // 4 = 0, kept at >= 1


def test_resolve_k_init_at_least_k():
    # cap 64 // 4 = 16 is below k = 20: raised to k
    assert resolve_k_init(None, 20, 64) == 20


def test_resolve_k_init_explicit_value():
    assert resolve_k_init(8, 2, 1024) == 8
    assert resolve_k_init(2, 2, 1024) == 2
    assert resolve_k_init(100, 2, 64) == 16  # explicit values are capped too


def test_resolve_k_init_below_k_raises_naming_k_init():
    with pytest.raises(ValueError, match="k_init"):
        resolve_k_init(4, 8, 1024)


def test_train_config_k_init_must_be_positive():
    with pytest.raises(ValueError, match="k_init"):
        TrainConfig(k_init=0)
