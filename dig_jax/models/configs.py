"""Model configs: the DiG/DiT size tables and a validated `ml_collections.ConfigDict` per model name.

`model_config_for("DiG-XL/2", input_size=64)` gives a complete config (every field present);
`resolve_model_config` checks any config (unknown fields rejected, missing ones filled with defaults, 0 sizes
taken from the size table) and is what `create_model` calls. Sizes (official `DiG_models` / `DiT_models`):

  size  depth  hidden  heads (DiT)  heads (DiG)
  S     12     384     6            6
  B     12     768     12           12
  L     24     1024    16           16
  XL    28     1152    16           18   (DiG-XL uses 18 heads so every size has head dims 32 (qk) / 64 (v))

Names: "DiG-S/2", "DiT-XL/4", ... (patch 2, 4 or 8 for both archs; the official code registers DiG only at
/2). `input_size` may be an int or (H, W); since ConfigDict fixes a field's type on creation, pass a
non-square size through `model_config_for(..., input_size=(H, W))` rather than assigning it later.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections

from dig_jax.models import srem
from pallas_kernels.gla import GlaImpl

ARCHS = ("dig", "dit")
SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIG_NUM_HEADS = {"XL": 18}
PATCH_SIZES = (2, 4, 8)

CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ARCHS,
    "size": tuple(SIZES),
    "gla_impl": tuple(impl.value for impl in GlaImpl),
    "gla_gate_dtype": ("float32", "compute"),
    "attention_impl": ("xla", "cudnn", "auto"),
    "scan_schedule": srem.SCAN_SCHEDULES,
    "dwconv": srem.DWCONV_MODES,
    "dwconv_impl": srem.DWCONV_IMPLS,
    "norm": ("layernorm", "rmsnorm"),
    "dtype": ("float32", "bfloat16"),
    "remat": ("none", "block"),
}


def default_fields() -> dict[str, Any]:
  """Every model-config field with its default (sizes 0 = from the size table)."""
  return dict(
      arch="dig",
      size="S",
      depth=0,
      hidden_size=0,
      num_heads=0,
      patch_size=2,
      input_size=32,
      in_channels=4,
      num_classes=1000,
      learn_sigma=True,
      class_dropout_prob=0.1,
      mlp_ratio=4.0,
      gla_impl="auto",
      gla_chunk_size=64,
      gla_fused_proj=False,
      gla_gate_dtype="float32",
      gla_fused_gate=True,
      attention_impl="auto",
      scan_schedule="crisscross",
      dwconv="identity",
      dwconv_impl="auto",
      norm="layernorm",
      dtype="float32",
      remat="none",
      stack_blocks=True,
      scan_unroll=0,
      cfg_channels=3,
  )


def parse_model_name(name: str) -> tuple[str, str, int]:
  """"DiG-XL/2" -> ("dig", "XL", 2)."""
  match = re.fullmatch(r"(DiG|DiT)-(S|B|L|XL)/(\d+)", name.strip())
  if match is None:
    raise ValueError(f"unknown model name {name!r}; expected e.g. 'DiG-S/2', 'DiG-XL/2', 'DiT-B/4' "
                     f"(sizes {tuple(SIZES)}, patches {PATCH_SIZES})")
  arch, size, patch = match.group(1).lower(), match.group(2), int(match.group(3))
  if patch not in PATCH_SIZES:
    raise ValueError(f"model {name!r}: patch size must be one of {PATCH_SIZES}")
  return arch, size, patch


def table_sizes(arch: str, size: str) -> dict[str, int]:
  sizes = dict(SIZES[size])
  if arch == "dig":
    sizes["num_heads"] = DIG_NUM_HEADS.get(size, sizes["num_heads"])
  return sizes


def model_config_for(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The complete, validated config of a named model, with `overrides` applied (unknown keys rejected)."""
  arch, size, patch = parse_model_name(name)
  fields = default_fields()
  fields.update(arch=arch, size=size, patch_size=patch, **table_sizes(arch, size))
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown model config fields {unknown}; known: {sorted(fields)}")
  fields.update(overrides)
  return resolve_model_config(fields)


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return config.to_dict()
  return dict(config)


def input_hw(input_size: Any) -> tuple[int, int]:
  """int or (H, W) -> (H, W)."""
  if isinstance(input_size, int) and not isinstance(input_size, bool):
    return input_size, input_size
  if isinstance(input_size, (tuple, list)) and len(input_size) == 2 and all(
      isinstance(v, int) for v in input_size):
    return int(input_size[0]), int(input_size[1])
  raise ValueError(f"input_size must be an int or (H, W); got {input_size!r}")


def resolve_model_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Validates a model config and returns a complete copy (defaults filled in, 0 sizes from the table)."""
  given = _as_dict(config)
  fields = default_fields()
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ValueError(f"unknown model config fields {unknown}; known: {sorted(fields)}")
  fields.update(given)
  for key, choices in CHOICES.items():
    if fields[key] not in choices:
      raise ValueError(f"model config {key}={fields[key]!r}; choose one of {choices}")
  for key, value in table_sizes(fields["arch"], fields["size"]).items():
    if not fields[key]:
      fields[key] = value
  h, w = input_hw(fields["input_size"])
  fields["input_size"] = h if h == w else (h, w)
  d, heads, p = fields["hidden_size"], fields["num_heads"], fields["patch_size"]
  positive = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "num_classes",
              "gla_chunk_size")
  for key in positive:
    if not isinstance(fields[key], int) or fields[key] < 1:
      raise ValueError(f"model config {key} must be a positive int; got {fields[key]!r}")
  if h % p or w % p:
    raise ValueError(f"input_size {(h, w)} must be divisible by patch_size {p}")
  if d % 4:
    raise ValueError(f"hidden_size {d} must be divisible by 4 (2-D sin-cos table)")
  if d % heads or (fields["arch"] == "dig" and (d // 2) % heads):
    raise ValueError(f"hidden_size {d} (and, for DiG, hidden_size/2) must be divisible by num_heads {heads}")
  if not 0.0 <= fields["class_dropout_prob"] <= 1.0:
    raise ValueError(f"class_dropout_prob must be in [0, 1]; got {fields['class_dropout_prob']}")
  out_channels = fields["in_channels"] * (2 if fields["learn_sigma"] else 1)
  if not 0 <= fields["cfg_channels"] <= out_channels:
    raise ValueError(f"cfg_channels must be in [0, {out_channels}]; got {fields['cfg_channels']}")
  for key in ("gla_fused_proj", "gla_fused_gate", "stack_blocks"):
    if not isinstance(fields[key], bool):
      raise ValueError(f"{key} must be True or False; got {fields[key]!r}")
  if not isinstance(fields["scan_unroll"], int) or isinstance(fields["scan_unroll"], bool) or (
      fields["scan_unroll"] < 0):
    raise ValueError(f"scan_unroll must be an int >= 0 (0: fully unrolled); got {fields['scan_unroll']!r}")
  if fields["mlp_ratio"] <= 0:
    raise ValueError(f"mlp_ratio must be > 0; got {fields['mlp_ratio']}")
  return ml_collections.ConfigDict(fields)
