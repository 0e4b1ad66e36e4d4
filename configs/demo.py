"""Demo: a small class-conditional DiG on the 4,500 embedded MNIST training digits, in pixel space (32x32x1).

Runs on a laptop CPU in a few minutes and ends with a grid of guided samples, one column per digit class, in
``<workdir>/samples/step_XXXXXXX.png``:
  python -m dig_jax.main                                   # = --config=configs/demo.py --workdir=workdir/demo
  python -m dig_jax.main --config.num_train_steps=500      # any field can be overridden
  python -m dig_jax.sample --workdir=workdir/demo --num_samples=100 --sampler=ddim --num_steps=50 \\
      --cfg_scale=3

Differences from the paper's recipe (configs/common.py), all for speed on a CPU: a tiny DiG (depth 4,
width 96, 2 heads, patch 4 = 64 tokens, GLA chunk 16), batch 32, 1500 steps, lr 1e-3 with a short warm-up
and clipping, EMA decay 0.995 (the EMA starts from the random init, and 0.999 would still hold 30% of it
after 1200 steps: its samples are noise), and DDIM-50 sampling with cfg 3 for the grid. The data, the
diffusion (T = 1000, linear betas, learned sigma, loss = MSE + VLB) and the label dropout (0.1) are
unchanged. Not tuned yet: sizes and step count are a first guess (4-5 steps/s on 2 busy CPU cores, batch 32
had the best images/s); after 1500 steps the samples are still blob-like and the class conditioning weak.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config; ``arg="runlocal"`` shrinks it to a smoke test (a few steps, tiny sampling)."""
  args = common.parse_arg(arg, runlocal=False)
  config = common.get_base_config()
  config.model_name = "DiG-demo"
  config.model = common.model_config(
      "DiG-S/4", depth=4, hidden_size=96, num_heads=2, input_size=32, in_channels=1, num_classes=10,
      cfg_channels=1, gla_chunk_size=16)
  config.input.update(dict(dataset="embedded_mnist", split="train", image_size=32, channels=1, batch_size=32,
                           random_flip=False, num_classes=10, num_workers=0))
  config.optim.update(dict(learning_rate=1e-3, warmup_steps=100, schedule="constant", grad_clip_norm=1.0))
  config.ema_decay = 0.995
  config.num_train_steps = 1500
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.sample_every_steps = 750
  config.sample.update(dict(sampler="ddim", num_steps=50, cfg_scale=3.0, num_images=40, labels="",
                            clip_denoised=True))
  if args.runlocal:
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.sample_every_steps = 0
    config.sample.update(dict(num_steps=4, num_images=10))
  return config
