"""DiT-S/2 on ImageNet 256x256 in SD-VAE latent space (32x32x4), the paper's recipe (configs/common.py).

Usage:
  python -m dig_jax.main --config=configs/dit_s2.py --workdir=runs/dit_s2 --config.input.data_dir=/data/tfds
  python -m dig_jax.main --config=configs/dit_s2.py:runlocal=True --workdir=/tmp/dit_s2   # tiny local check
Until the VAE is ported the loop stops with a NotImplementedError naming `config.latent.vae`.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.imagenet256_config("DiT-S/2", arg)
