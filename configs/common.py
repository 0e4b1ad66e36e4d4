"""Shared config blocks for dig-jax: the base training config and the paper's ImageNet-256 recipe.

Every config file in this folder has ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``.
``main.py`` loads it with ``lock_config=True``, so ``--config.section.field=value`` overrides any field that
exists and an unknown field is an error. ``arg`` is a comma-separated ``key=value`` string after the file name
(``--config=configs/xl2.py:runlocal=True``), parsed by `parse_arg`.

Configs are plain data. The one import from ``dig_jax`` is ``model_config_for`` (the table of DiG/DiT sizes),
done inside `model_config` so that every model field is present in the config (overridable, and written to
``workdir/config.json`` so sampling rebuilds exactly the trained model).

Recipe defaults (dig_spec.md section 4): AdamW lr 1e-4 constant, betas (0.9, 0.999), eps 1e-8, weight
decay 0, no warm-up, no clipping, fp32, EMA 0.9999 updated every step, global batch 256, 400K steps,
checkpoint every 1000 steps, DDPM sampling with 250 respaced steps, cfg 1.5 for the guided numbers, linear
schedule with T=1000, learned sigma, label dropout 0.1.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

# Mesh axis names and how the models' logical axis names map onto them: the defaults live with the code that
# interprets them (dig_jax/sharding.py); a config copies them so every run records and can override its layout.
from dig_jax.sharding import DEFAULT_MESH as MESH  # noqa: E402  (constants only)
from dig_jax.sharding import DEFAULT_RULES as LOGICAL_AXIS_RULES  # noqa: E402

SD_VAE = "sd-vae-ft-ema"
SD_VAE_SCALE = 0.18215


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict over `defaults` (values take the defaults' types).

  A bare word sets a bool default to True (``"runlocal"`` == ``"runlocal=True"``). Unknown keys are an error.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      parsed[key] = True
    elif isinstance(default, bool):
      if value.strip().lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} must be true or false.")
      parsed[key] = value.strip().lower() in ("true", "1")
    else:
      parsed[key] = type(default)(value.strip()) if default is not None else value.strip()
  return parsed


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The full model config of a named size ("DiG-S/2", "DiT-XL/2", ...) with overrides."""
  from dig_jax.models import model_config_for  # pylint: disable=g-import-not-at-top
  return model_config_for(name, **overrides)


def get_base_config() -> ml_collections.ConfigDict:
  """Fields every training config has; callers set ``model``, ``input`` and the step counts."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model_name = ""
  config.model = ml_collections.ConfigDict()
  # A new run (empty workdir) starts from these weights: a folder written by `python -m dig_jax.convert
  # import` (official DiG/DiT checkpoints). Unset: random init. Resuming a workdir ignores it.
  config.init_from = config_dict.placeholder(str)

  config.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000,       # T of the training process.
      noise_schedule="linear",  # betas 1e-4 .. 0.02.
      min_snr_gamma=0.0,        # > 0: Min-SNR-gamma weighting of the epsilon MSE (off in the paper).
  ))

  config.input = ml_collections.ConfigDict(dict(
      dataset="synthetic",      # embedded_mnist | sklearn_digits | tfds | image_folder | synthetic
      tfds_name="",
      data_dir=config_dict.placeholder(str),
      split="train",
      image_size=32,
      channels=3,
      batch_size=256,           # GLOBAL batch, split over processes and data-parallel devices.
      random_flip=True,
      num_classes=1000,
      num_workers=0,            # grain worker processes (0 = in the main process).
  ))

  # Latent diffusion: with a VAE name the model sees VAE latents (f=8, 4 channels, times scale_factor).
  config.latent = ml_collections.ConfigDict(dict(vae=config_dict.placeholder(str), scale_factor=SD_VAE_SCALE))

  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      schedule="constant",      # constant | cosine (cosine decays to learning_rate * min_lr_ratio).
      warmup_steps=0,
      min_lr_ratio=0.0,
      grad_clip_norm=0.0,       # 0 = no clipping.
  ))
  config.ema_decay = 0.9999

  config.num_train_steps = 400_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3               # the newest N checkpoints are kept ...
  config.keep_every_steps = 0               # ... plus every multiple of this (0 = none).
  config.async_checkpointing = True
  config.sample_every_steps = 50_000        # 0 = only at the end.

  config.sample = ml_collections.ConfigDict(dict(
      sampler="ddpm",           # ddpm | ddim | dpm
      num_steps=250,
      cfg_scale=1.5,            # 1.0 = no guidance.
      eta=0.0,                  # DDIM only.
      clip_denoised=False,      # Clip predicted x0 to [-1, 1] (ddpm/ddim); DiT: off (latents).
      num_images=16,            # images in the grid written during training.
      labels="",                # "" = classes 0, 1, 2, ... (mod num_classes); or "3,1,4".
      seed=0,
  ))

  # Tuples, so the command line can override them: --config.mesh="(('data',-1),('fsdp',2),...)".
  config.mesh = tuple(MESH)
  config.logical_axis_rules = tuple(LOGICAL_AXIS_RULES)
  return config


def imagenet256_config(model_name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's ImageNet 256x256 latent-space recipe for any DiG/DiT size.

  Data: an image folder built once into array_record (no TensorFlow needed):
    python -m dig_jax.input_pipeline build --image_root=/data/imagenet/train --data_dir=/data/tfds \\
        --name=imagenet256 --image_size=256
  then train with ``--config.input.data_dir=/data/tfds``. Latents come from SD's sd-vae-ft-ema on the fly; the
  VAE is not ported yet, so the loop stops with a clear NotImplementedError until it is.

  Args:
    model_name: "DiG-XL/2", "DiT-B/2", ...
    arg: ``runlocal`` shrinks batch, steps and cadences for a quick local check.
  """
  args = parse_arg(arg, runlocal=False)
  config = get_base_config()
  config.model_name = model_name
  config.model = model_config(model_name, input_size=32, in_channels=4, num_classes=1000)
  config.input.update(dict(dataset="image_folder", tfds_name="imagenet256", image_size=256, channels=3,
                           batch_size=256, random_flip=True, num_classes=1000, num_workers=8))
  config.latent.vae = SD_VAE
  config.num_train_steps = 400_000
  config.checkpoint_every_steps = 1000
  config.keep_every_steps = 100_000
  config.sample_every_steps = 50_000
  if args.runlocal:
    config.input.batch_size = 8
    config.input.num_workers = 0
    config.num_train_steps = 10
    config.log_every_steps = 1
    config.checkpoint_every_steps = 5
    config.keep_every_steps = 0
    config.sample_every_steps = 0
    config.sample.update(dict(num_steps=10, num_images=4))
  return config
