"""Learning-rate and sparsity-coefficient schedules (Gemma Scope §3, as read in the recipe §2).

- Learning rate: cosine warm-up from ``start·lr`` to ``lr`` over the first ``warmup`` steps, then constant::

      lr(t) = lr · (start + (1 − start) · (1 − cos(π t / warmup)) / 2)     for t < warmup

  and, with ``decay`` > 0 (not in the recipe: the short-budget preset, docs/training.md), a linear decay to 0
  over the last ``decay`` of the ``T`` steps, multiplying the above::

      lr(t) · (T − t) / decay                                          for t ≥ T − decay

- Sparsity coefficient: linear warm-up from 0 to λ over the first ``warmup`` steps, then constant::

      λ(t) = λ · min(1, t / warmup)

``t`` is the index of the optimizer step being taken (0 for the first step).
"""

from __future__ import annotations

import math


def learning_rate(step: int, lr: float, warmup_steps: int = 1000, start: float = 0.1, *, decay_steps: int = 0,
                  total_steps: int | None = None) -> float:
    """The learning rate for step ``step`` (cosine warm-up from ``start·lr`` to ``lr``; with ``decay_steps``, a
    linear decay to 0 over the last ``decay_steps`` of ``total_steps``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if decay_steps and total_steps is None:
        raise ValueError("a learning-rate decay needs total_steps")
    value = lr
    if warmup_steps > 0 and step < warmup_steps:
        progress = step / warmup_steps
        value = lr * (start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * progress)))
    if decay_steps > 0 and step >= total_steps - decay_steps:
        value *= max(total_steps - step, 0) / decay_steps
    return value


def sparsity_coefficient(step: int, final: float, warmup_steps: int = 10_000) -> float:
    """λ for step ``step`` (linear warm-up from 0 to ``final``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps <= 0 or step >= warmup_steps:
        return final
    return final * (step / warmup_steps)
