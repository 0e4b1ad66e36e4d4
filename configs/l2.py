"""DiG-L/2 on ImageNet 256x256 in SD-VAE latent space (32x32x4), the paper's recipe (configs/common.py).

Usage:
  python -m dig_jax.main --config=configs/l2.py --workdir=runs/l2 --config.input.data_dir=/data/tfds
  python -m dig_jax.main --config=configs/l2.py:runlocal=True --workdir=/tmp/l2   # tiny local check
Until the VAE is ported the loop stops with a NotImplementedError naming `config.latent.vae`.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.imagenet256_config("DiG-L/2", arg)
