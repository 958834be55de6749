"""Progressive k-annealing (CSRv2): the k used at each optimizer step. Pure functions."""

from __future__ import annotations


def k_at_step(step: int, total_steps: int, k_init: int, k_final: int, decay_ratio: float = 0.7) -> int:
    """k_t = round((1 - p) k_init + p k_final) with p = step / (decay_ratio * total_steps), then k_final.

    `step` counts optimizer steps from 0. With k_init == k_final this is the fixed-k schedule of CSR.
    """
    decay_steps = decay_ratio * total_steps
    if step >= decay_steps:
        return k_final
    p = step / decay_steps
    return round((1 - p) * k_init + p * k_final)
