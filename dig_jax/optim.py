"""The optimizer and learning-rate schedule built from ``config.optim``.

The paper's recipe (dig_spec.md section 4) is torch ``AdamW`` with lr 1e-4 constant, betas (0.9, 0.999),
eps 1e-8, weight decay 0, no warm-up and no gradient clipping; those are the defaults of configs/common.py.
Options beyond the recipe: linear warm-up, a cosine decay to ``learning_rate * min_lr_ratio``, clipping by the
global gradient norm, and weight decay (applied to every parameter, as torch AdamW does with one param group).

Parameters are fp32 master weights whatever the model's compute dtype: the optimizer state and updates are in
the parameters' dtype.
"""

from __future__ import annotations

from typing import Any

import optax

SCHEDULES = ("constant", "cosine")


def create_learning_rate_schedule(optim_config: Any, num_train_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0 for the first update)."""
  lr = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  name = str(optim_config.schedule)
  if lr <= 0:
    raise ValueError(f"config.optim.learning_rate must be positive, got {lr}.")
  if warmup < 0:
    raise ValueError(f"config.optim.warmup_steps must be >= 0, got {warmup}.")
  if name == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], boundaries=[warmup])
  if name == "cosine":
    if num_train_steps <= warmup:
      raise ValueError(f"cosine schedule: num_train_steps ({num_train_steps}) must exceed warmup_steps "
                       f"({warmup}).")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=num_train_steps,
        end_value=lr * float(optim_config.min_lr_ratio))
  raise ValueError(f"Unknown config.optim.schedule {name!r}; use one of {SCHEDULES}.")


def create_optimizer(optim_config: Any, num_train_steps: int) -> tuple[optax.GradientTransformation,
                                                                      optax.Schedule]:
  """(AdamW with optional clipping, its learning-rate schedule)."""
  schedule = create_learning_rate_schedule(optim_config, num_train_steps)
  adamw = optax.adamw(learning_rate=schedule, b1=float(optim_config.b1), b2=float(optim_config.b2),
                      eps=float(optim_config.eps), weight_decay=float(optim_config.weight_decay))
  clip = float(optim_config.grad_clip_norm)
  if clip < 0:
    raise ValueError(f"config.optim.grad_clip_norm must be >= 0 (0 = off), got {clip}.")
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
  return tx, schedule
