"""Whole models: DiG-S/2 forward + grad under jit, DiT with XLA attention, classifier-free guidance, label
dropout, bfloat16 compute, remat, input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models import create_model, model_config_for
from tests.models.test_support import apply, build, inputs, normal, randomize_zero_params, tiny_config


def test_dig_s2_forward_and_grad_under_jit():
  cfg = model_config_for("DiG-S/2")
  # Initialised under one jit: eagerly, every initializer would compile for each of DiG-S/2's own shapes.
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0))))
  params, rest = jax.jit(lambda: nnx.split(create_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:])()
  assert "pos_embed" in rest and "pos_embed" not in params
  x, t, y = inputs(cfg)
  target = normal(7, (2, 32, 32, 8))

  @jax.jit
  def loss_and_grad(params):
    def loss(params):
      out = nnx.merge(graphdef, params, rest)(x, t.astype(jnp.int32), y)
      return jnp.mean((out - target) ** 2), out
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, out), grads = loss_and_grad(params)
  assert out.shape == (2, 32, 32, 8) and out.dtype == jnp.float32
  assert np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  # adaLN-Zero: at init only the final linear receives a gradient.
  assert np.abs(np.asarray(grads["final_layer"]["linear"]["kernel"].get_value())).max() > 0
  assert not np.any(np.asarray(grads["blocks"]["attn"]["q_proj"]["kernel"].get_value()))


def test_dit_forward_with_xla_attention():
  cfg = tiny_config("dit", attention_impl="xla")
  model = randomize_zero_params(build(cfg), seed=1)
  x, t, y = inputs(cfg)
  out = np.asarray(apply(model, x, t, y))
  assert out.shape == (2, 8, 8, 8) and np.all(np.isfinite(out)) and np.abs(out).max() > 0
  auto = randomize_zero_params(build(tiny_config("dit", attention_impl="auto")), seed=1)
  np.testing.assert_allclose(np.asarray(apply(auto, x, t, y)), out, rtol=1e-5, atol=1e-6)


def test_forward_with_cfg_matches_two_plain_forwards():
  cfg = tiny_config()
  model = randomize_zero_params(build(cfg), seed=2)
  x, t, y = inputs(cfg, batch=2)
  other = normal(9, x.shape)
  x2 = jnp.concatenate([x, other])          # second half is ignored: the first half is used twice
  t2 = jnp.concatenate([t, t])
  y2 = jnp.concatenate([y, jnp.full((2,), cfg.num_classes)])
  scale = 4.0
  graphdef, state = nnx.split(model)
  guided = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s).forward_with_cfg(x2, t2, y2, scale))(state))
  cond = np.asarray(apply(model, x, t, y))
  uncond = np.asarray(apply(model, x, t, jnp.full((2,), cfg.num_classes)))
  eps = uncond[..., :3] + scale * (cond[..., :3] - uncond[..., :3])
  np.testing.assert_allclose(guided[:2, ..., :3], eps, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(guided[2:, ..., :3], eps, rtol=1e-4, atol=1e-5)
  # Unguided: eps channel 3 and the variance channels.
  np.testing.assert_allclose(guided[:2, ..., 3:], cond[..., 3:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(guided[2:, ..., 3:], uncond[..., 3:], rtol=1e-5, atol=1e-6)
  assert np.abs(cond[..., :3] - uncond[..., :3]).max() > 1e-3  # the guidance is not trivially zero


def test_label_dropout_only_with_an_rng():
  cfg = tiny_config(class_dropout_prob=1.0)
  model = randomize_zero_params(build(cfg), seed=3)
  x, t, y = inputs(cfg)
  null = np.asarray(apply(model, x, t, jnp.full((2,), cfg.num_classes)))
  labelled = np.asarray(apply(model, x, t, y))
  dropped = np.asarray(apply(model, x, t, y, label_drop_rng=jax.random.key(0)))
  np.testing.assert_array_equal(dropped, null)
  assert np.abs(labelled - null).max() > 1e-3
  # With the default probability 0.1 and a batch of 64, some but not all labels are dropped.
  model.y_embedder.dropout_prob = 0.1
  labels = jnp.arange(64) % cfg.num_classes
  emb_drop = model.y_embedder(labels, jax.random.key(1))
  table = model.y_embedder.embedding_table.get_value()
  is_null = np.all(np.asarray(emb_drop) == np.asarray(table[cfg.num_classes]), axis=-1)
  assert 0 < is_null.sum() < 20
  np.testing.assert_array_equal(np.asarray(emb_drop)[~is_null], np.asarray(table[labels])[~is_null])


@pytest.mark.parametrize("arch", ["dig", "dit"])
def test_bfloat16_compute_stays_close_to_float32(arch):
  f32 = randomize_zero_params(build(tiny_config(arch, attention_impl="xla")), seed=4)
  bf16 = randomize_zero_params(build(tiny_config(arch, attention_impl="xla", dtype="bfloat16")), seed=4)
  assert bf16.blocks.adaln_modulation.kernel.get_value().dtype == jnp.float32  # params stay float32
  x, t, y = inputs(f32.config)
  ref = np.asarray(apply(f32, x, t, y))
  low = np.asarray(apply(bf16, x, t, y))
  assert low.dtype == np.float32 and np.all(np.isfinite(low))
  assert np.abs(low - ref).max() <= 0.05 * np.abs(ref).max()


def test_remat_blocks_trace_and_give_the_same_loss():
  x, t, y = inputs(tiny_config())
  plain = randomize_zero_params(build(tiny_config()), seed=5)
  remat = randomize_zero_params(build(tiny_config(remat="block")), seed=5)
  graphdef, params, rest = nnx.split(remat, nnx.Param, ...)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x, t, y) ** 2)  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(float(value), float(jnp.sum(apply(plain, x, t, y) ** 2)), rtol=1e-5)
  q_grad = np.asarray(grads["blocks"]["attn"]["q_proj"]["kernel"].get_value())
  assert np.all(np.isfinite(q_grad)) and np.abs(q_grad).max() > 0


def test_bad_inputs_raise_clear_errors():
  model = build(tiny_config())
  x, t, y = inputs(model.config)
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.transpose(x, (0, 3, 1, 2)), t, y)
  with pytest.raises(ValueError, match="shape"):
    model(x, t[:1], y)
  with pytest.raises(ValueError, match="even batch"):
    model.forward_with_cfg(x[:1], t[:1], y[:1], 1.5)
