"""Stem pieces against independent references: MAE sin-cos table, timestep sinusoid, patchify/unpatchify."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dig_jax.models import create_model, model_config_for
from dig_jax.models.embeddings import PatchEmbed, sincos_2d_table, timestep_sinusoid, unpatchify


def mae_table_by_loops(dim, grid_h, grid_w):
  """Per-entry formula: channel j < D/2 encodes the column w, j >= D/2 the row h; each half is [sin | cos]."""
  table = np.zeros((grid_h * grid_w, dim))
  quarter = dim // 4
  for h in range(grid_h):
    for w in range(grid_w):
      for j in range(dim):
        coord, jj = (w, j) if j < dim // 2 else (h, j - dim // 2)
        i = jj % quarter
        angle = coord / 10000 ** (i / quarter)
        table[h * grid_w + w, j] = math.sin(angle) if jj < quarter else math.cos(angle)
  return table


def test_sincos_table_matches_mae_formula_square_and_non_square():
  np.testing.assert_allclose(sincos_2d_table(16, 4, 4), mae_table_by_loops(16, 4, 4), atol=1e-12)
  np.testing.assert_allclose(sincos_2d_table(24, 3, 5), mae_table_by_loops(24, 3, 5), atol=1e-12)
  # The stored table of a (non-square) model is that table, float32, shape [1, T, D].
  cfg = model_config_for("DiG-S/2", depth=1, hidden_size=64, num_heads=2, input_size=(6, 10))
  model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
  assert model.pos_embed.get_value().shape == (1, 15, 64)


def test_pos_embed_variable_holds_the_table():
  cfg = model_config_for("DiT-S/2", depth=1, hidden_size=16, num_heads=2, input_size=(6, 10), num_classes=3)
  table = jax.jit(lambda: nnx.state(create_model(cfg, rngs=nnx.Rngs(0)))["pos_embed"].get_value())()
  np.testing.assert_allclose(np.asarray(table[0]), mae_table_by_loops(16, 3, 5), atol=1e-6)
  assert table.dtype == jnp.float32


def test_timestep_embedding_is_cos_first():
  t = np.array([0.0, 1.0, 17.0, 999.5])
  emb = np.asarray(timestep_sinusoid(jnp.asarray(t, jnp.float32)))
  freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  assert emb.shape == (4, 256)
  np.testing.assert_allclose(emb, expected, atol=2e-4)  # float32 arguments up to ~1000 rad.
  np.testing.assert_allclose(emb[:, 0], np.cos(t), atol=2e-4)
  np.testing.assert_allclose(emb[:, 128], np.sin(t), atol=2e-4)
  # Integer timesteps give the same embedding.
  np.testing.assert_allclose(np.asarray(timestep_sinusoid(jnp.array([0, 1, 17]))), emb[:3], atol=1e-6)


def test_patch_embed_equals_torch_conv_with_converted_weight():
  """A torch Conv2d weight [D, C, p, p] maps to our kernel by permute(2, 3, 1, 0).reshape(p*p*C, D)."""
  n, c, h, w, p, d = 2, 3, 4, 6, 2, 5
  rng = np.random.default_rng(0)
  x_nchw = rng.normal(size=(n, c, h, w)).astype(np.float32)
  weight = rng.normal(size=(d, c, p, p)).astype(np.float32)
  bias = rng.normal(size=(d,)).astype(np.float32)
  conv = jax.lax.conv_general_dilated(x_nchw, weight, (p, p), "VALID",
                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))
  # torch: proj(x).flatten(2).transpose(1, 2)
  expected = (np.asarray(conv) + bias[None, :, None, None]).reshape(n, d, -1).transpose(0, 2, 1)
  embed = PatchEmbed(p, c, d, rngs=nnx.Rngs(0), dtype=jnp.float32)
  embed.proj.kernel.set_value(jnp.asarray(weight.transpose(2, 3, 1, 0).reshape(p * p * c, d)))
  embed.proj.bias.set_value(jnp.asarray(bias))
  got = embed(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_unpatchify_matches_official_nchw_order():
  n, rows, cols, p, c = 2, 2, 3, 2, 5
  tokens = np.random.default_rng(1).normal(size=(n, rows * cols, p * p * c)).astype(np.float32)
  # Official: reshape (n, h, w, p, p, c) -> einsum nhwpqc->nchpwq -> (n, c, h*p, w*p); here H != W.
  official = np.einsum("nhwpqc->nchpwq", tokens.reshape(n, rows, cols, p, p, c))
  official = official.reshape(n, c, rows * p, cols * p)
  got = np.asarray(unpatchify(jnp.asarray(tokens), (rows, cols), p, c))
  np.testing.assert_array_equal(got, official.transpose(0, 2, 3, 1))


def test_patch_embed_init_is_xavier_on_flattened_view():
  embed = PatchEmbed(4, 4, 256, rngs=nnx.Rngs(3), dtype=jnp.float32)
  kernel = np.asarray(embed.proj.kernel.get_value())
  bound = math.sqrt(6 / (4 * 4 * 4 + 256))
  assert kernel.shape == (64, 256) and np.abs(kernel).max() <= bound
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.03)
  assert not np.any(np.asarray(embed.proj.bias.get_value()))
