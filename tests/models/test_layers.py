"""Layers against independent NumPy references written from dig_spec.md: the GLA layer (§2.3), SwiGLU (§2.4),
DiT attention, adaLN-Zero ordering and identity at init, the final layer."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models.dig import DiGBlock
from dig_jax.models.dit import Attention, DiTBlock
from dig_jax.models.gla_attention import GatedLinearAttention
from dig_jax.models.layers import FinalLayer, SwiGLU, swiglu_inner_size
from pallas_kernels.gla.gate import low_rank_log_gate
from tests.models.test_support import build, inputs, normal, randomize_zero_params, tiny_config


def np_value(var):
  return np.asarray(var.get_value(), np.float64)


def silu(x):
  return x / (1 + np.exp(-x))


def layer_norm(x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def gla_layer_reference(layer, x):
  """DiG's GLA layer in float64 with the token-by-token recurrence S_t = diag(a_t) S_{t-1} + k_t v_t^T."""
  n, t, d = x.shape
  h, dk, dv = layer.num_heads, layer.head_k_dim, layer.head_v_dim
  q = (x @ np_value(layer.q_proj.kernel)).reshape(n, t, h, dk)
  k = (x @ np_value(layer.k_proj.kernel)).reshape(n, t, h, dk)
  v = (x @ np_value(layer.v_proj.kernel)).reshape(n, t, h, dv)
  g = (x @ np_value(layer.g_proj.kernel)).reshape(n, t, h, dv)
  logits = x @ np_value(layer.gk_proj_down.kernel) @ np_value(layer.gk_proj_up.kernel) + np_value(
      layer.gk_proj_up.bias)
  gk = (-np.logaddexp(0, -logits) / 16).reshape(n, t, h, dk)  # logsigmoid / 16
  o = np.zeros((n, t, h, dv))
  state = np.zeros((n, h, dk, dv))
  for i in range(t):
    state = np.exp(gk[:, i])[..., None] * state + k[:, i, :, :, None] * v[:, i, :, None, :]
    o[:, i] = np.einsum("nhk,nhkv->nhv", q[:, i] * dk ** -0.5, state)
  o = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + 1e-6) * np_value(layer.g_norm_swish_gate.weight)
  o = o * silu(g)
  return o.reshape(n, t, h * dv) @ np_value(layer.o_proj.kernel)


@pytest.mark.parametrize("impl,chunk,fused_proj", [("chunked", 4, True), ("chunked", 4, False),
                                                   ("recurrent", None, True)])
def test_gla_layer_matches_reference(impl, chunk, fused_proj):
  layer = GatedLinearAttention(64, 2, rngs=nnx.Rngs(0), dtype=jnp.float32, impl=impl, chunk_size=chunk,
                               fused_proj=fused_proj)
  assert (layer.head_k_dim, layer.head_v_dim) == (16, 32)
  # A spread of forget gates (the zero-init bias would give all decays ~0.958).
  layer.gk_proj_up.bias.set_value(2.0 * normal(1, (32,)))
  layer.g_norm_swish_gate.weight.set_value(1 + 0.3 * normal(2, (32,)))
  x = np.asarray(normal(3, (2, 10, 64)))
  got = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), gla_layer_reference(layer, x.astype(np.float64)),
                             rtol=1e-4, atol=1e-5)


def test_gla_fused_projection_equals_separate_ones_in_bfloat16_and_gate_dtype_switch():
  """One concatenated GEMM gives the four projections exactly as four GEMMs would (same bf16 dot products)."""
  x = normal(4, (2, 12, 96))
  layers = {fused: GatedLinearAttention(96, 3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, fused_proj=fused)
            for fused in (True, False)}
  fused, separate = (nnx.jit(lambda m, x: m.project_qkvg(x))(layers[f], x) for f in (True, False))
  assert [a.shape for a in fused] == [(2, 12, 3, 16), (2, 12, 3, 16), (2, 12, 3, 32), (2, 12, 3, 32)]
  for a, b in zip(fused, separate):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
  # gate_dtype="compute": the low-rank gate projections run in bf16; the log gate stays float32 and close.
  gate_bf16 = GatedLinearAttention(96, 3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, gate_dtype="compute")
  assert gate_bf16.gk_proj_down.dtype == jnp.bfloat16 and layers[True].gk_proj_down.dtype == jnp.float32
  lg32, lg16 = (m.log_forget_gate(x) for m in (layers[True], gate_bf16))
  assert lg16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(lg16), np.asarray(lg32), rtol=0.05, atol=2e-3)
  with pytest.raises(ValueError, match="gate_dtype"):
    GatedLinearAttention(96, 3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, gate_dtype="half")


def test_gla_layer_shapes_and_init():
  layer = GatedLinearAttention(384, 6, rngs=nnx.Rngs(0), dtype=jnp.float32)
  assert (layer.head_k_dim, layer.head_v_dim) == (32, 64)
  shapes = {name: getattr(layer, name).kernel.get_value().shape
            for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gk_proj_down", "gk_proj_up")}
  assert shapes == {"q_proj": (384, 192), "k_proj": (384, 192), "v_proj": (384, 384), "g_proj": (384, 384),
                    "o_proj": (384, 384), "gk_proj_down": (384, 16), "gk_proj_up": (16, 192)}
  assert all(getattr(layer, name).bias is None
             for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gk_proj_down"))
  bound = 2 ** -2.5 * math.sqrt(6 / (384 + 192))
  q = np_value(layer.q_proj.kernel)
  assert np.abs(q).max() <= bound
  np.testing.assert_allclose(q.std(), bound / math.sqrt(3), rtol=0.03)
  assert np.abs(np_value(layer.gk_proj_up.kernel)).max() <= 2 ** -2.5 * math.sqrt(6 / (16 + 192))
  assert not np.any(np_value(layer.gk_proj_up.bias))
  np.testing.assert_array_equal(np_value(layer.g_norm_swish_gate.weight), np.ones(64))


def test_swiglu_matches_fused_torch_layout():
  assert [swiglu_inner_size(d, 4.0) for d in (384, 768, 1024, 1152)] == [1024, 2048, 2816, 3072]
  mlp = SwiGLU(64, 4.0, rngs=nnx.Rngs(0), dtype=jnp.float32)
  inner = mlp.inner_size
  assert inner == 256 and mlp.gate_proj.kernel.get_value().shape == (64, 2, 256)
  fused = np_value(mlp.gate_proj.kernel).reshape(64, 2 * inner).T  # torch gate_proj.weight [2I, D]
  down = np_value(mlp.down_proj.kernel).T                            # torch down_proj.weight [D, I]
  x = np.random.default_rng(0).normal(size=(2, 5, 64))
  y = x @ fused.T
  expected = (silu(y[..., :inner]) * y[..., inner:]) @ down.T
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x, jnp.float32))), expected, rtol=1e-4, atol=1e-5)
  # xavier gain 1 on the fused [2I, D] matrix.
  assert np.abs(fused).max() <= math.sqrt(6 / (64 + 512))


def test_dit_attention_matches_softmax_attention_with_torch_qkv_layout():
  attn = Attention(64, 4, rngs=nnx.Rngs(0), dtype=jnp.float32, impl="xla")
  attn.qkv.bias.set_value(0.1 * normal(0, (3, 64)))
  w_qkv = np_value(attn.qkv.kernel).reshape(64, 192).T  # torch qkv.weight [3D, D]
  b_qkv = np_value(attn.qkv.bias).reshape(192)
  x = np.random.default_rng(1).normal(size=(2, 6, 64))
  qkv = (x @ w_qkv.T + b_qkv).reshape(2, 6, 3, 4, 16).transpose(2, 0, 3, 1, 4)  # timm: (3, N, H, T, hd)
  q, k, v = qkv
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(16)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  o = (weights @ v).transpose(0, 2, 1, 3).reshape(2, 6, 64)
  expected = o @ np_value(attn.proj.kernel) + np_value(attn.proj.bias)
  np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x, jnp.float32))), expected, rtol=1e-4, atol=1e-5)


def test_adaln_zero_blocks_are_identity_and_models_output_zero_at_init():
  tokens = normal(0, (2, 16, 64))
  c = normal(1, (2, 64))
  for arch in ("dig", "dit"):
    cfg = tiny_config(arch, stack_blocks=False)  # blocks[0] is a block of its own
    x, t, y = inputs(cfg)
    graphdef, state = nnx.split(build(cfg))

    @jax.jit
    def run(state):
      model = nnx.merge(graphdef, state)
      block = model.blocks[0]
      return model(x, t, y), (block(tokens, c, (4, 4)) if arch == "dig" else block(tokens, c))

    out, block_out = run(state)
    assert out.shape == (2, 8, 8, 8)
    assert not np.any(np.asarray(out)), arch
    np.testing.assert_array_equal(np.asarray(block_out), np.asarray(tokens))


def jnp_layer_norm(x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _block_vs_formula(block, x, c, grid=None):
  """(block(x, c), the adaLN-Zero formula with the chunks in the documented order), one jit."""
  graphdef, state = nnx.split(block)

  @jax.jit
  def run(state):
    blk = nnx.merge(graphdef, state)
    mods = jax.nn.silu(c) @ blk.adaln_modulation.kernel.get_value() + blk.adaln_modulation.bias.get_value()
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods[:, None], 6, axis=-1)
    h = x + gate_msa * blk.attn(jnp_layer_norm(x) * (1 + scale_msa) + shift_msa)
    h = h + gate_mlp * blk.mlp(jnp_layer_norm(h) * (1 + scale_mlp) + shift_mlp)
    if grid is None:
      return blk(x, c), h
    return blk(x, c, grid), blk.dw_conv(h, grid)

  return run(state)


def test_dig_block_follows_the_adaln_formula_in_the_documented_order():
  block = DiGBlock(tiny_config(dwconv="random"), rngs=nnx.Rngs(5), dtype=jnp.float32)
  randomize_zero_params(block, seed=1)
  x = normal(0, (2, 16, 64))
  c = normal(1, (2, 64))
  got, expected = _block_vs_formula(block, x, c, grid=(4, 4))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(got - x)).max() > 0.1


def test_dit_block_and_final_layer_modulation_order():
  block = randomize_zero_params(DiTBlock(tiny_config("dit"), rngs=nnx.Rngs(5), dtype=jnp.float32), 2)
  x = normal(0, (2, 16, 64))
  c = normal(1, (2, 64))
  got, expected = _block_vs_formula(block, x, c)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)

  final = randomize_zero_params(FinalLayer(64, 2, 8, rngs=nnx.Rngs(0), dtype=jnp.float32), 3)
  xn, cn = np.asarray(x, np.float64), np.asarray(c, np.float64)
  mods = silu(cn) @ np_value(final.adaln_modulation.kernel) + np_value(final.adaln_modulation.bias)
  shift, scale = mods[:, None, :64], mods[:, None, 64:]
  expected = (layer_norm(xn) * (1 + scale) + shift) @ np_value(final.linear.kernel)
  expected += np_value(final.linear.bias)
  np.testing.assert_allclose(np.asarray(final(x, c)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate_dtype", ["float32", "compute"])
def test_gla_fused_gate_is_the_same_layer_off_the_gpu_kernel(gate_dtype):
  """fused_gate=True hands the gate to the op unformed; off the GPU kernels (here: chunked) the op evaluates
  the same formula, so outputs and every parameter gradient equal the unfused layer's; the log gate it
  describes is log_forget_gate's."""
  x = normal(5, (2, 20, 96))
  layers = {f: GatedLinearAttention(96, 3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, fused_gate=f,
                                    gate_dtype=gate_dtype) for f in (True, False)}
  layers[True].gk_proj_up.bias.set_value(jnp.linspace(-2.0, 2.0, 48))
  layers[False].gk_proj_up.bias.set_value(jnp.linspace(-2.0, 2.0, 48))
  gate = layers[True].low_rank_gate(x)
  assert gate.normalizer == 16 and gate.matmul_dtype == ("float32" if gate_dtype == "float32" else "bfloat16")
  np.testing.assert_array_equal(np.asarray(low_rank_log_gate(gate, 3)),
                                np.asarray(layers[False].log_forget_gate(x).reshape(2, 20, 3, 16)))

  def loss(layer, x):
    return jnp.sum(layer(x).astype(jnp.float32) ** 2)

  (fused_loss, fused_grads), (loss_ref, grads_ref) = (
      nnx.jit(nnx.value_and_grad(loss))(layers[f], x) for f in (True, False))
  assert float(fused_loss) == float(loss_ref)
  for (path, a), (_, b) in zip(nnx.to_flat_state(fused_grads), nnx.to_flat_state(grads_ref)):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
