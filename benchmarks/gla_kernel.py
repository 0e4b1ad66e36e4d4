"""GLA kernel benchmark on one GPU: our Pallas kernel vs the XLA chunked reference, fla's chunk_gla, cuDNN.

Run on the GPU machine: `python benchmarks/gla_kernel.py --mode MODE [--out DIR] [--shapes "B,T,H,K,V;..."]`.
Every mode records the environment (device, jax/jaxlib/triton/torch/fla versions, nvidia-smi) and measures the
device-to-device copy bandwidth (bytes read + written) as the HBM ceiling, then:
- `full`: times forward and forward+backward of our kernel (tuned config), the XLA chunked reference, fla's
  `chunk_gla` (PyTorch; optional: an import or run error is recorded and the run goes on) and cuDNN attention
  (head dim 64, as a yardstick) at B=8, H=6, T = 256..12544 and B=2, T=50176, head dims 32/64 then 64/64;
  prints a table and writes `<out>/gla_kernel_<card>.json` after every shape;
- `check`: correctness at real sizes: our kernel (bf16 and fp32 inputs, forward and all four gradients,
  several configs) against the chunked reference in fp32 at HIGHEST precision, DiG-like and extreme
  (-1e-3..-10) gates, and fla's output against the same reference (`..._check.json`);
- `parts`: each Pallas kernel alone under several tilings (`..._parts.json`); `short`: configs at DiG's short
  sequences (S/2 at 256 px: B=32, T=256; at 512 px: B=8, T=1024), where the op is latency-bound; `fp32`: fp32
  inputs with IEEE vs TF32 dots in the kernels (time, and error against the fp32 reference);
- `variants`: named variants of the tuned config side by side, with fla (`--no_fla` skips it; its first
  autotuning per head size takes minutes): `--variants "name=field:value,field:value;..."` (KernelConfig
  fields; `chunk:N` sets the chunk size) or a preset name from VARIANT_PRESETS (`cumsum`: the gate's cumsum as
  a scan or a GEMM; `ktile`: session 5's K tiles; `intra`: one reference row vs the levels; `segments`: the
  state passes in 1-16 parallel segments; `grad`, `sweep`: sessions 1-2's `--mode grad` / `--mode sweep`, now
  applied on top of the tuned config); `--parts` also times the output and gradient kernels alone per variant;
  `--gates extreme` times log-uniform 1e-3..10 gates instead of DiG's (the one-row path's fallback to the
  levels); a sixth field "fp32" in a --shapes entry runs fp32 inputs and records each variant's errors;
- `cumsum`: the XLA glue alone: the gate's chunk-local cumsum and its transpose, per
  `reference.chunk_local_cumsum` method, and how far the methods differ (`..._cumsum.json`).
Timing = median over repeats of back-to-back calls after warm-up, rotating three input sets, synchronised with
block_until_ready / torch.cuda.synchronize. Run `full` and `check` as separate processes with their own
timeouts: compile and autotuning times (XLA's and fla's) vary a lot.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", message=".*Triton backend is deprecated.*")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.gla import gpu, reference  # noqa: E402

from benchmarks.bench_common import (LOG, card_slug, copy_bandwidth, env_info, jax_sync,  # noqa: E402
                                     load_fla, log, make_inputs, rel_err, time_calls, time_fla, to_torch)


# ------------------------------------------------------------------------------------------------ impls (JAX)


def ours(cfg: gpu.KernelConfig | None = None, chunk: int | None = None):
  return lambda q, k, v, g: gpu.gla(q, k, v, g, chunk_size=chunk, config=cfg)


def xla_chunked(q, k, v, g):
  return reference.chunked_gla(q, k, v, g)


def jax_fwd_bwd(f):
  def run(q, k, v, g, do):
    o, vjp = jax.vjp(f, q, k, v, g)
    return vjp(do)
  return jax.jit(run)


def cudnn_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


# ----------------------------------------------------------------------------------------------------- checks


REF32 = jax.jit(lambda q, k, v, g: reference.chunked_gla(q, k, v, g, precision=jax.lax.Precision.HIGHEST))
REF32_FWD_BWD = jax_fwd_bwd(lambda q, k, v, g: reference.chunked_gla(q, k, v, g,
                                                                     precision=jax.lax.Precision.HIGHEST))


def check_case(b, t, h, dk, dv, gates, dtype, cfg, seed) -> dict:
  q, k, v, g, do = make_inputs(jax.random.key(seed), b, t, h, dk, dv, dtype, gates)
  up = [x.astype(jnp.float32) for x in (q, k, v, g, do)]
  f = ours(cfg)
  o, o_ref = jax.jit(f)(q, k, v, g), REF32(*up[:4])
  grads, grads_ref = jax_fwd_bwd(f)(q, k, v, g, do), REF32_FWD_BWD(*up)
  return dict(out=rel_err(o, o_ref), **{f"d{n}": rel_err(a, r) for n, a, r in zip("qkvg", grads, grads_ref)})


def check_correctness(fla_fn, save_fn=lambda rows: None) -> list[dict]:
  rows = []
  cases = [(8, 4096, 6, 32, 64, "dig"), (2, 12544, 6, 32, 64, "extreme"), (2, 4100, 6, 64, 64, "extreme"),
           (1, 2000, 2, 128, 128, "extreme"), (32, 256, 6, 32, 64, "dig")]
  for i, (b, t, h, dk, dv, gates) in enumerate(cases):
    for dtype in (jnp.bfloat16, jnp.float32):
      for name, cfg in CHECK_CONFIGS.items():
        if name != "tuned" and i != 0:
          continue
        row = dict(shape=[b, t, h, dk, dv], gates=gates, dtype=jnp.dtype(dtype).name, config=name)
        try:
          row.update(check_case(b, t, h, dk, dv, gates, dtype, cfg, 100 + i))
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        rows.append(row)
        log("check " + json.dumps(row))
        save_fn(rows)
    if fla_fn is not None and dk == 32 and i == 0:
      try:
        q, k, v, g, do = make_inputs(jax.random.key(100 + i), b, t, h, dk, dv, jnp.bfloat16, gates)
        o = fla_fn(*(to_torch(x) for x in (q, k, v, g.astype(jnp.float32))))[0]
        o = np.asarray(o.float().cpu().numpy())
        o_ref = REF32(*(x.astype(jnp.float32) for x in (q, k, v, g)))
        row = dict(shape=[b, t, h, dk, dv], gates=gates, dtype="bfloat16", impl="fla", out=rel_err(o, o_ref))
        rows.append(row)
        log("check " + json.dumps(row))
      except Exception as e:  # noqa: BLE001
        log(f"fla check failed: {type(e).__name__}: {e}")
  return rows


PARTS_SHAPES = ((8, 12544, 6, 32, 64), (2, 50176, 6, 32, 64), (32, 256, 6, 32, 64))


def parts_bench(base_config: gpu.KernelConfig = gpu.KernelConfig()) -> list[dict]:
  """Times each kernel alone (several tilings) to see where the time goes."""
  rows = []
  rep = dataclasses.replace
  for b, t, h, dk, dv in PARTS_SHAPES:
    q, k, v, lg, do = make_inputs(jax.random.key(1), b, t, h, dk, dv, jnp.bfloat16)
    base = rep(base_config, scale=dk ** -0.5)
    g = reference.chunk_local_cumsum(lg, base.chunk_size)
    row = dict(shape=[b, t, h, dk, dv], ms={})

    def timed(name, fn, *args):
      try:
        row["ms"][name] = time_calls(jax.jit(fn), [args], jax_sync) * 1e3
      except Exception as e:  # noqa: BLE001
        row["ms"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    for name, cfg in STATE_VARIANTS.items():
      cfg = rep(base, **cfg)
      timed(f"state/{name}", lambda k, v, g, cfg=cfg: gpu._states(k, v, g, cfg), k, v, g)
      timed(f"dstate/{name}", lambda q, g, do, cfg=cfg: gpu._dstates(q, g, do, cfg), q, g, do)
    hs = gpu._states(k, v, g, base)
    ds = gpu._dstates(q, g, do, base)
    for name, cfg in OUT_VARIANTS.items():
      cfg = rep(base, **cfg)
      timed(f"out/{name}", lambda q, k, v, g, hs, cfg=cfg: gpu._outputs(q, k, v, g, hs, cfg), q, k, v, g, hs)
    for name, cfg in FUSED_VARIANTS.items():
      cfg = rep(base, **cfg)
      timed(f"fused/{name}", lambda q, k, v, g, cfg=cfg: gpu._fused_forward(q, k, v, g, cfg, False)[0],
            q, k, v, g)
    for name, cfg in GRAD_VARIANTS.items():
      cfg = rep(base, **cfg)
      timed(f"grad/{name}", lambda *a, cfg=cfg: gpu._grads(*a, cfg), q, k, v, g, do, hs, ds)
    timed("xla_glue/cumsum", lambda lg: reference.chunk_local_cumsum(lg, 64), lg)
    log("parts " + json.dumps(row))
    rows.append(row)
  return rows


STATE_VARIANTS = {
    "k32v32": {}, "k32v32_pf": dict(prefetch=True), "k16v16": dict(state_block_k=16, state_block_v=16),
    "k16v16_pf": dict(state_block_k=16, state_block_v=16, prefetch=True),
    "k16v32_pf": dict(state_block_k=16, state_block_v=32, prefetch=True),
    "k32v64_pf": dict(state_block_v=64, prefetch=True), "k32v32_s3": dict(stages=3),
    "k16v16_pf_w2": dict(state_block_k=16, state_block_v=16, prefetch=True, warps_state=2),
    "k16v16_pf_w1": dict(state_block_k=16, state_block_v=16, prefetch=True, warps_state=1),
}
OUT_VARIANTS = {"w4": {}, "w2": dict(warps_out=2), "w8": dict(warps_out=8), "w4_s1": dict(stages=1),
                "w4_s3": dict(stages=3)}
FUSED_VARIANTS = {"bv64": {}, "bv64_pf": dict(prefetch=True), "bv32_pf": dict(fwd_block_v=32, prefetch=True),
                  "bv32_pf_w8": dict(fwd_block_v=32, prefetch=True, warps_fused=8)}
GRAD_VARIANTS = {"w4": {}, "w8": dict(warps_grad=8), "w4_bv32": dict(grad_block_v=32),
                 "w4_s1": dict(stages=1), "w4_s3": dict(stages=3)}
CHECK_CONFIGS = {"tuned": None, "fused": gpu.KernelConfig(fused=True),
                 "no_prefetch": gpu.KernelConfig(prefetch=False)}


# ----------------------------------------------------------------------------------------------- timing table


def min_fwd_bytes(b, t, h, dk, dv):
  """Fully fused forward floor: q, k, v, o in bf16 plus the fp32 cumulative gate (gla_kernels.md §5.2)."""
  return b * t * h * (2 * (2 * dk + 2 * dv) + 4 * dk)


def bench_shape(b, t, h, dk, dv, impls: dict, fla_fn, bw: float, with_attention: bool,
                dtype=jnp.bfloat16, gates: str = "dig") -> dict:
  sets = [make_inputs(jax.random.key(s), b, t, h, dk, dv, dtype, gates) for s in range(3)]
  row = dict(shape=dict(B=b, T=t, H=h, K=dk, V=dv), ms={})
  floor_s = min_fwd_bytes(b, t, h, dk, dv) / bw
  row["hbm_floor_fwd_ms"] = floor_s * 1e3
  for name, f in impls.items():
    try:
      fwd = time_calls(jax.jit(f), [s[:4] for s in sets], jax_sync)
      fb = time_calls(jax_fwd_bwd(f), sets, jax_sync)
      row["ms"][name] = dict(fwd=fwd * 1e3, fwd_bwd=fb * 1e3, fwd_over_floor=fwd / floor_s)
    except Exception as e:  # noqa: BLE001
      row["ms"][name] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
    log(f"  {name}: {row['ms'][name]}")
  if fla_fn is not None:
    try:
      fwd, fb = time_fla(fla_fn, sets)
      row["ms"]["fla"] = dict(fwd=fwd * 1e3, fwd_bwd=fb * 1e3, fwd_over_floor=fwd / floor_s)
    except Exception as e:  # noqa: BLE001
      row["ms"]["fla"] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
  if with_attention:
    try:
      att = [tuple(jax.random.normal(jax.random.key(9 + s), (b, t, h, 64), jnp.bfloat16) for _ in range(3))
             for s in range(2)]
      fwd = time_calls(jax.jit(cudnn_attention), att, jax_sync)

      def att_fb(q, k, v):
        o, vjp = jax.vjp(cudnn_attention, q, k, v)
        return vjp(o)
      fb = time_calls(jax.jit(att_fb), att, jax_sync)
      row["ms"]["cudnn_attention_d64"] = dict(fwd=fwd * 1e3, fwd_bwd=fb * 1e3)
    except Exception as e:  # noqa: BLE001
      row["ms"]["cudnn_attention_d64"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
  del sets
  log("time " + json.dumps(row))
  return row


def print_table(rows: list[dict], bw: float) -> None:
  names = sorted({n for r in rows for n in r["ms"]})
  log(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; times in ms (fwd / fwd+bwd); floor = fused-forward HBM floor")
  log("shape (B,T,H,K,V)".ljust(26) + "floor".rjust(7) + "".join(n[:22].rjust(24) for n in names))
  for r in rows:
    s = r["shape"]
    line = f"{s['B']},{s['T']},{s['H']},{s['K']},{s['V']}".ljust(26) + f"{r['hbm_floor_fwd_ms']:7.3f}"
    for n in names:
      m = r["ms"].get(n, {})
      cell = "err" if "error" in m else ("-" if not m else f"{m['fwd']:.3f}/{m['fwd_bwd']:.3f}")
      line += cell.rjust(24)
    log(line)


VARIANT_PRESETS = {
    "cumsum": "scan=gate_cumsum:scan;matmul=gate_cumsum:matmul",
    "ktile": "s64_g64=score_block_k:64,grad_block_k:64;s32_g64=score_block_k:32,grad_block_k:64;"
             "s64_g32=score_block_k:64,grad_block_k:32;s32_g32=score_block_k:32,grad_block_k:32",
    "grad": "grad_v1=grad_version:1;grad_v2=grad_version:2;grad_v2_w8=grad_version:2,warps_grad:8;"
            "grad_v2_w2=grad_version:2,warps_grad:2",
    "intra": "adaptive=intra:adaptive;levels=intra:levels",
    "segments": "seg1=state_segments:1;seg4=state_segments:4;seg8=state_segments:8;seg16=state_segments:16",
    "sweep": "two_pass=fused:false;two_pass_no_prefetch=fused:false,prefetch:false;"
             "two_pass_st16=fused:false,state_block_k:16,state_block_v:16;fused=fused:true;"
             "fused_bv32=fused:true,fwd_block_v:32",
}
DEFAULT_VARIANT_SHAPES = ((8, 4096, 6, 32, 64), (8, 12544, 6, 32, 64), (2, 50176, 6, 32, 64),
                          (8, 4096, 6, 64, 64), (8, 12544, 6, 64, 64), (2, 50176, 6, 64, 64))


def parse_variants(text: str) -> dict[str, tuple[dict, int | None]]:
  """"name=field:value,...;..." (or a VARIANT_PRESETS name) -> {name: (KernelConfig overrides, chunk)}."""
  text = VARIANT_PRESETS.get(text, text)
  fields = {f.name for f in dataclasses.fields(gpu.KernelConfig)}
  variants = {}
  for item in filter(None, text.split(";")):
    name, _, spec = item.partition("=")
    overrides, chunk = {}, None
    for pair in filter(None, spec.split(",")):
      key, _, value = pair.partition(":")
      parsed = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
      if key == "chunk":
        chunk = int(value)
      elif key in fields:
        overrides[key] = parsed
      else:
        raise ValueError(f"--variants: {key!r} is not a KernelConfig field ({sorted(fields)}) or 'chunk'")
    variants[name.strip()] = (overrides, chunk)
  if not variants:
    raise ValueError(f"--variants is empty; give 'name=field:value;...' or one of {sorted(VARIANT_PRESETS)}")
  return variants


def cumsum_row(b, t, h, dk, dv) -> dict:
  """XLA glue before/after the kernels: the chunk-local cumsum of the gate and its transpose, per method."""
  del dv
  lg = make_inputs(jax.random.key(2), b, t, h, dk, dk, jnp.float32)[3]
  cts = jax.random.normal(jax.random.key(3), lg.shape, jnp.float32)
  row = dict(shape=dict(B=b, T=t, H=h, K=dk), ms={})
  outs = {}
  chunks = (b, t // 64, 64, h, dk)
  ones = jnp.tril(jnp.ones((64, 64), jnp.float32))

  def unbatched_matmul(x):  # the tril GEMM without batch axes: XLA transposes the gates around it
    return jnp.einsum("rc,bnchd->bnrhd", ones, x.reshape(chunks),
                      precision=jax.lax.Precision.HIGHEST).reshape(x.shape)

  def algorithm(name):  # the batched tril GEMM under another dot algorithm (X9 / TF32 X3: GPUs only)
    return lambda x: reference.tril_matmul_cumsum(x, 64, getattr(jax.lax.DotAlgorithmPreset, name))
  methods = {m: (lambda x, m=m: reference.chunk_local_cumsum(x, 64, m)) for m in reference.CUMSUM_METHODS}
  methods.update(matmul_unbatched=unbatched_matmul, matmul_bf16x6=algorithm("BF16_BF16_F32_X6"),
                 matmul_bf16x9=algorithm("BF16_BF16_F32_X9"), matmul_tf32x3=algorithm("TF32_TF32_F32_X3"),
                 associative=lambda x: jax.lax.associative_scan(jnp.add, x.reshape(chunks), axis=2).reshape(
                     x.shape))
  for method, fn in methods.items():
    transpose = jax.jit(lambda x, ct, fn=fn: jax.vjp(fn, x)[1](ct)[0])
    try:
      outs[method] = (jax.jit(fn)(lg), transpose(lg, cts))
      row["ms"][method] = dict(fwd=time_calls(jax.jit(fn), [(lg,)], jax_sync) * 1e3,
                               transpose=time_calls(transpose, [(lg, cts)], jax_sync) * 1e3)
    except Exception as e:  # noqa: BLE001 - an algorithm this backend lacks
      row["ms"][method] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
  row["rel_diff_vs_scan"] = {m: [rel_err(o[i], outs["scan"][i]) for i in (0, 1)] for m, o in outs.items()}
  log("cumsum " + json.dumps(row))
  return row


def variant_parts(b, t, h, dk, dv, configs: dict, dtype) -> dict:
  """ms of the output kernel and of the gradient kernels (dv + dq/dk/dG) alone, per variant."""
  q, k, v, lg, do = make_inputs(jax.random.key(1), b, t, h, dk, dv, dtype)
  parts = {}
  for name, (cfg, chunk) in configs.items():
    cfg = dataclasses.replace(cfg, scale=dk ** -0.5, chunk_size=chunk or cfg.chunk_size)
    g = reference.chunk_local_cumsum(lg, cfg.chunk_size)
    try:
      hs, ds = gpu._states(k, v, g, cfg), gpu._dstates(q, g, do, cfg)
      out = time_calls(jax.jit(lambda *a, cfg=cfg: gpu._outputs(*a, cfg)), [(q, k, v, g, hs)], jax_sync)
      grads = time_calls(jax.jit(lambda *a, cfg=cfg: gpu._grads(*a, cfg)), [(q, k, v, g, do, hs, ds)],
                         jax_sync)
      parts[name] = dict(out_ms=out * 1e3, grads_ms=grads * 1e3)
    except Exception as e:  # noqa: BLE001
      parts[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
  return parts


# (config, chunk) pairs for `--mode short`; None = the tuned default for the shape.
SHORT_SWEEP = {
    "tuned_c64": (None, 64),
    "fused_c64": (gpu.KernelConfig(fused=True), 64),
    "two_pass_c64": (gpu.KernelConfig(fused=False), 64),
    "fused_c64_w8": (gpu.KernelConfig(fused=True, warps_fused=8), 64),
    "fused_c64_bv32": (gpu.KernelConfig(fused=True, fwd_block_v=32), 64),
    "tuned_c32": (None, 32),
    "fused_c32": (gpu.KernelConfig(fused=True), 32),
    "tuned_c16": (None, 16),
    "grad_w8_c64": (gpu.KernelConfig(fused=True, warps_grad=8, warps_out=8), 64),
    "grad_w2_c64": (gpu.KernelConfig(fused=True, warps_grad=2, warps_out=2), 64),
    "state16_c64": (gpu.KernelConfig(fused=True, state_block_k=16, state_block_v=16), 64),
}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", default="full",
                      choices=["full", "check", "parts", "short", "fp32", "variants", "cumsum"])
  default_out = os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--out", default=default_out)
  parser.add_argument("--shapes", default="")
  parser.add_argument("--configs", default="", help="--mode short: comma-separated SHORT_SWEEP names")
  parser.add_argument("--variants", default="cumsum", help="--mode variants: see the module docstring")
  parser.add_argument("--parts", action="store_true", help="--mode variants: also time kernels alone")
  parser.add_argument("--no_fla", action="store_true", help="--mode variants: skip fla")
  parser.add_argument("--gates", default="dig", choices=["dig", "extreme"],
                      help="--mode variants: DiG-like gates, or log-uniform 1e-3..10 per step (decay spans "
                           "beyond the one-reference-row limit: the levels' fallback)")
  args = parser.parse_args()
  shapes = [tuple(int(x) if x.isdigit() else x for x in s.split(",")) for s in args.shapes.split(";")
            if s] if args.shapes else []
  os.makedirs(args.out, exist_ok=True)
  result = dict(env=env_info(), mode=args.mode)
  log(json.dumps(result["env"], indent=1))
  fla_fn, fla_version, fla_error = load_fla()
  result["fla"] = dict(version=fla_version, error=fla_error)
  log(f"fla: {result['fla']}")
  bw = copy_bandwidth()
  result["copy_bandwidth_TBps"] = bw / 1e12
  log(f"copy bandwidth: {bw / 1e12:.3f} TB/s")
  slug = card_slug(result["env"]["device"])

  suffix = "" if args.mode == "full" else f"_{args.mode}"

  def save():
    with open(os.path.join(args.out, f"gla_kernel_{slug}{suffix}.json"), "w") as fh:
      json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, f"gla_kernel_{args.mode}.log"), "w") as fh:
      fh.write("\n".join(LOG))

  def time_shapes(shape_list, row_for) -> None:
    """One timing row per (B, T, H, K, V), saved after each; then the table."""
    rows = []
    for shape in shape_list:
      rows.append(row_for(*shape))
      result["timings"] = rows
      save()
    print_table(rows, bw)

  try:
    if args.mode == "check":
      result["correctness"] = check_correctness(fla_fn, save_fn=lambda rows: (result.update(correctness=rows),
                                                                               save()))
    elif args.mode == "parts":
      result["parts"] = parts_bench()
    elif args.mode == "fp32":  # IEEE vs TF32 dots for fp32 inputs
      def fp32_row(b, t, h, dk, dv):
        tuned = gpu.tuned_config((b, t, h, dk), (b, t, h, dv))
        configs = {f"ours_{d}": dataclasses.replace(tuned, fp32_dots=d) for d in ("ieee", "tf32")}
        row = bench_shape(b, t, h, dk, dv, {n: ours(c) for n, c in configs.items()}, None, bw,
                          with_attention=False, dtype=jnp.float32)
        row["errors"] = {n: check_case(b, t, h, dk, dv, "dig", jnp.float32, c, 0) for n, c in configs.items()}
        log("errors " + json.dumps(row["errors"]))
        return row
      time_shapes(shapes or ((32, 256, 6, 32, 64), (8, 4096, 6, 32, 64)), fp32_row)
    elif args.mode == "variants":
      variants = parse_variants(args.variants)
      result["variants"] = args.variants
      suffix += "" if args.gates == "dig" else f"_{args.gates}"

      def variants_row(b, t, h, dk, dv, dtype=jnp.bfloat16):
        tuned = gpu.tuned_config((b, t, h, dk), (b, t, h, dv), dtype=dtype)
        configs = {f"ours_{n}": (dataclasses.replace(tuned, **kw), chunk)
                   for n, (kw, chunk) in variants.items()}
        row = bench_shape(b, t, h, dk, dv, {n: ours(*c) for n, c in configs.items()},
                          fla_fn if dtype == jnp.bfloat16 and not args.no_fla else None, bw,
                          with_attention=False, dtype=dtype, gates=args.gates)
        row.update(dtype=jnp.dtype(dtype).name, gates=args.gates, tuned=dataclasses.asdict(tuned))
        if args.parts:
          row["parts"] = variant_parts(b, t, h, dk, dv, configs, dtype)
          log("parts " + json.dumps(row["parts"]))
        if dtype == jnp.float32:
          row["errors"] = {n: check_case(b, t, h, dk, dv, "extreme", dtype, c[0], 0)
                           for n, c in configs.items()}
          log("errors " + json.dumps(row["errors"]))
        return row
      # A sixth field "fp32" in --shapes times fp32 inputs (and checks their errors).
      time_shapes([s[:5] + ((jnp.float32,) if len(s) > 5 else ()) for s in shapes] or DEFAULT_VARIANT_SHAPES,
                  variants_row)
    elif args.mode == "cumsum":
      result["timings"] = [cumsum_row(*s[:5]) for s in shapes or DEFAULT_VARIANT_SHAPES]
    elif args.mode == "short":
      names = args.configs.split(",") if args.configs else list(SHORT_SWEEP)
      time_shapes(shapes or ((32, 256, 6, 32, 64), (8, 1024, 6, 32, 64)),
                  lambda *s: bench_shape(*s, {n: ours(*SHORT_SWEEP[n]) for n in names}, None, bw,
                                         with_attention=True))
    else:
      default_shapes = [(8, t, 6, 32, 64) for t in (256, 1024, 4096, 12544)] + [(2, 50176, 6, 32, 64)]
      default_shapes += [(8, t, 6, 64, 64) for t in (1024, 4096, 12544)] + [(2, 50176, 6, 64, 64)]

      def full_row(b, t, h, dk, dv):
        impls = {"ours": ours(), "xla_chunked": xla_chunked}
        if t > 12544:  # the XLA reference's backward at 50K tokens is slow and memory-hungry: skipped there
          impls.pop("xla_chunked")
        row = bench_shape(b, t, h, dk, dv, impls, fla_fn, bw, with_attention=dk == 32)
        row["ours_config"] = dataclasses.asdict(gpu.tuned_config((b, t, h, dk), (b, t, h, dv)))
        return row
      time_shapes(shapes or default_shapes, full_row)
  except Exception:  # noqa: BLE001
    result["fatal"] = traceback.format_exc()
    log(result["fatal"])
  save()


if __name__ == "__main__":
  main()
