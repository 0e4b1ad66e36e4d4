"""Official PyTorch checkpoints (hustvl/DiG, facebookresearch/DiT) <-> our NNX parameters.

API:
  load_torch_state_dict(path, which="ema") -> {torch key: np.ndarray}
      .pt/.pth/.bin (torch zip format, read with or without torch) or .safetensors
  import_official(state_dict, model_config) -> nnx.State     every key checked, nothing half-loaded
  load_into_model(model, state_dict)                         in place; the model is untouched on error
  export_official(model_or_state, model_config=None) -> {torch key: np.ndarray}   official keys/order/layouts
  save_torch_state_dict(state_dict, path)                    .safetensors always, .pt/.pth/.bin with torch
  infer_config_overrides(state_dict, patch_size)             the model-config fields a checkpoint fixes:
                                                             input_size, in_channels, num_classes, ...
  load_imported(folder, model_config, abstract_params, abstract_model_state)
                                                             an `import` output for a run (config.init_from)

CLI:
  python -m dig_jax.convert import --checkpoint=PATH --model=DiG-XL/2 --out=DIR [--which=ema|model]
      [--overrides='{"scan_schedule": "crisscross"}']
  python -m dig_jax.convert export --workdir=DIR --out=FILE.safetensors|.pt [--step=N]
`import` writes DIR/model_config.json and DIR/params, an orbax `StandardCheckpointer` checkpoint of the pytree
{"params": nnx.to_pure_dict(Param state), "model_state": nnx.to_pure_dict(the rest, i.e. pos_embed)}: the keys
and layout of the train state, so a trainer restores it with `StandardCheckpointer().restore(DIR/params,
{"params": abstract_params, "model_state": abstract_model_state})`.
`export` reads a training workdir (its config.json and EMA parameters) or a DIR written by `import`.

Key map, ours -> torch ("linear": our kernel [in, *out] is the torch weight [prod(out), in] transposed):
  pos_embed [1, T, D]                       pos_embed (copied)
  x_embedder/proj/kernel [p*p*C, D]         x_embedder.proj.weight [D, C, p, p], permute(2, 3, 1, 0) + reshape
  t_embedder/fc1, fc2                       t_embedder.mlp.0, t_embedder.mlp.2 (linear)
  y_embedder/embedding_table                y_embedder.embedding_table.weight
  blocks/i/adaln_modulation                 blocks.i.adaLN_modulation.1 (linear)
  DiG: blocks/i/attn/{q,k,v,g,o}_proj       blocks.i.attn.{q,k,v,g,o}_proj (linear, no bias)
       attn/gk_proj_down, gk_proj_up        attn.gk_proj.0 (no bias), attn.gk_proj.1 (linear)
       attn/g_norm_swish_gate/weight [64]   attn.g_norm_swish_gate.weight
       mlp/gate_proj [D, 2, I], down_proj   mlp.gate_proj.weight [2I, D], mlp.down_proj (linear, no bias)
       dw_conv/kernel [3, 3, 1, D], bias    dw_conv.weight [D, 1, 3, 3], permute(2, 3, 1, 0). No rotation: our
                                            blocks see the tokens in the official, physically permuted order
       norm{1,2}/weight (norm="rmsnorm")    norm{1,2}.weight and attn_norm / mlp_norm.weight (the official
                                            block registers one fla RMSNorm under both names: both are saved)
  DiT: attn/qkv [D, 3, D] + [3, D]          blocks.i.attn.qkv (linear); attn/proj, mlp/fc1, mlp/fc2 likewise
  final_layer/linear, adaln_modulation      final_layer.linear, final_layer.adaLN_modulation.1 (linear)
NCHW <-> NHWC needs nothing else: patch features are (p_row, p_col, channel) on both sides once the conv
weight is permuted, and the final linear's outputs are (p, q, c), as the official unpatchify reads them.
With `model.stack_blocks` the block parameters are stacked (blocks/... [depth, ...]); the key map above is
applied to the per-block layout and the blocks are stacked / unstacked around it. A run may start from an
`import` folder written with either layout (`load_imported` converts).

Deviations: training checkpoints give "ema" by default (which="model" for the raw weights); DDP `module.` and
torch.compile `_orig_mod.` prefixes are stripped; a DiT with norm="rmsnorm" (no official model) exports its
norms as blocks.i.norm{1,2}.weight; unconditional (num_classes=0) and long-skip models are not supported (nor
by dig_jax.models).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import sys
import zipfile
from collections import defaultdict
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx

from dig_jax import torch_files
from dig_jax.models import create_model, model_config_for, resolve_model_config
from dig_jax.models.backbone import stack_block_params, unstack_block_params
from dig_jax.models.embeddings import sincos_2d_table
from dig_jax.torch_files import CheckpointFormatError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# What `import` writes into its output folder.
IMPORTED_CONFIG_FILE = "model_config.json"
IMPORTED_PARAMS_DIR = "params"
# Model-config fields that fix the parameter shapes and the function the parameters compute: a run that starts
# from an imported folder must agree on all of them (implementation choices such as gla_impl, attention_impl,
# dtype or remat may differ).
ARCHITECTURE_FIELDS = ("arch", "depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels",
                       "num_classes", "learn_sigma", "mlp_ratio", "scan_schedule", "dwconv", "norm")
_PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One official tensor: its torch key, our parameter path and how the layouts differ."""
  torch_key: str
  ours: str
  kind: str = "copy"  # copy | linear | bias | patch | dwconv


def _linear(torch_prefix: str, our_prefix: str, bias: bool = True) -> list[Entry]:
  entries = [Entry(f"{torch_prefix}.weight", f"{our_prefix}/kernel", "linear")]
  if bias:
    entries.append(Entry(f"{torch_prefix}.bias", f"{our_prefix}/bias", "bias"))
  return entries


def _dig_block(t: str, o: str, cfg: ml_collections.ConfigDict) -> list[Entry]:
  rms = cfg.norm == "rmsnorm"
  out = [Entry(f"{t}.attn_norm.weight", f"{o}/norm1/weight")] if rms else []
  for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
    out += _linear(f"{t}.attn.{name}", f"{o}/attn/{name}", bias=False)
  out += _linear(f"{t}.attn.gk_proj.0", f"{o}/attn/gk_proj_down", bias=False)
  out += _linear(f"{t}.attn.gk_proj.1", f"{o}/attn/gk_proj_up")
  out += _linear(f"{t}.attn.o_proj", f"{o}/attn/o_proj", bias=False)
  out.append(Entry(f"{t}.attn.g_norm_swish_gate.weight", f"{o}/attn/g_norm_swish_gate/weight"))
  out += [Entry(f"{t}.mlp_norm.weight", f"{o}/norm2/weight")] if rms else []
  out += _linear(f"{t}.mlp.gate_proj", f"{o}/mlp/gate_proj", bias=False)
  out += _linear(f"{t}.mlp.down_proj", f"{o}/mlp/down_proj", bias=False)
  out += [Entry(f"{t}.norm1.weight", f"{o}/norm1/weight"),
          Entry(f"{t}.norm2.weight", f"{o}/norm2/weight")] if rms else []
  out += _linear(f"{t}.adaLN_modulation.1", f"{o}/adaln_modulation")
  if cfg.dwconv != "off":
    out += [
        Entry(f"{t}.dw_conv.weight", f"{o}/dw_conv/kernel", "dwconv"),
        Entry(f"{t}.dw_conv.bias", f"{o}/dw_conv/bias")
    ]
  return out


def _dit_block(t: str, o: str, cfg: ml_collections.ConfigDict) -> list[Entry]:
  rms = cfg.norm == "rmsnorm"
  out = [Entry(f"{t}.norm1.weight", f"{o}/norm1/weight")] if rms else []
  out += _linear(f"{t}.attn.qkv", f"{o}/attn/qkv") + _linear(f"{t}.attn.proj", f"{o}/attn/proj")
  out += [Entry(f"{t}.norm2.weight", f"{o}/norm2/weight")] if rms else []
  out += _linear(f"{t}.mlp.fc1", f"{o}/mlp/fc1") + _linear(f"{t}.mlp.fc2", f"{o}/mlp/fc2")
  return out + _linear(f"{t}.adaLN_modulation.1", f"{o}/adaln_modulation")


def official_layout(model_config: ml_collections.ConfigDict | Mapping[str, Any]) -> list[Entry]:
  """Every tensor of the official state dict in its order (own parameters first, then submodules in order)."""
  cfg = resolve_model_config(model_config)
  entries = [
      Entry("pos_embed", "pos_embed"),
      Entry("x_embedder.proj.weight", "x_embedder/proj/kernel", "patch"),
      Entry("x_embedder.proj.bias", "x_embedder/proj/bias")
  ]
  entries += _linear("t_embedder.mlp.0", "t_embedder/fc1") + _linear("t_embedder.mlp.2", "t_embedder/fc2")
  entries.append(Entry("y_embedder.embedding_table.weight", "y_embedder/embedding_table"))
  block = _dig_block if cfg.arch == "dig" else _dit_block
  for i in range(cfg.depth):
    entries += block(f"blocks.{i}", f"blocks/{i}", cfg)
  return entries + _linear("final_layer.linear", "final_layer/linear") + _linear(
      "final_layer.adaLN_modulation.1", "final_layer/adaln_modulation")


# Layout changes. `ours` is our parameter's shape; p is the patch size.


def _torch_shape(kind: str, ours: tuple[int, ...], p: int) -> tuple[int, ...]:
  if kind == "linear":
    return (math.prod(ours[1:]), ours[0])
  if kind == "bias":
    return (math.prod(ours),)
  if kind == "patch":
    return (ours[1], ours[0] // (p * p), p, p)
  if kind == "dwconv":
    return (ours[3], ours[2], ours[0], ours[1])
  return ours


def _to_torch(kind: str, value: np.ndarray, p: int) -> np.ndarray:
  if kind == "linear":
    return value.reshape(value.shape[0], -1).T
  if kind == "bias":
    return value.reshape(-1)
  if kind == "patch":
    return value.reshape(p, p, -1, value.shape[1]).transpose(3, 2, 0, 1)
  if kind == "dwconv":
    return value.transpose(3, 2, 0, 1)
  return value


def _from_torch(kind: str, value: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
  if kind == "linear":
    return value.T.reshape(ours)
  if kind in ("patch", "dwconv"):
    return value.transpose(2, 3, 1, 0).reshape(ours)
  return value.reshape(ours)


# Our side: flat {path: leaf} views of models, states and pure dicts.


def _flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, tuple[tuple[Any, ...], Any]]:
  """{"a/b/0/c": ((keys...), leaf)} for a nested pure dict."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      for sub, (keys, leaf) in _flatten(value, f"{path}/").items():
        flat[sub] = ((key, *keys), leaf)
    else:
      flat[path] = ((key,), value)
  return flat


def _pure(model_or_state: Any) -> Mapping[Any, Any]:
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state)
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  if isinstance(model_or_state, Mapping):
    return model_or_state
  raise TypeError(f"expected an nnx model, nnx.State or a pure dict of arrays; got {type(model_or_state)}")


def _values(tree: Mapping[Any, Any]) -> Any:
  """Nested dict with Variables (if any) replaced by their values."""
  return jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_state(model_config: ml_collections.ConfigDict | Mapping[str, Any]) -> nnx.State:
  """The model's state with ShapeDtypeStructs (nothing allocated)."""
  cfg = resolve_model_config(model_config)
  return nnx.state(nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0))))


def _per_block(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same model with one parameter set per block (the layout the key map is written for)."""
  return resolve_model_config({**cfg.to_dict(), "stack_blocks": False})


def _layout_and_shapes(cfg: ml_collections.ConfigDict) -> tuple[list[Entry], dict[str, Any]]:
  """The key map and our per-block-layout shapes {path: ShapeDtypeStruct} (whatever cfg.stack_blocks is)."""
  layout = official_layout(cfg)
  per_block = nnx.to_pure_dict(abstract_state(_per_block(cfg)))
  shapes = {path: leaf for path, (_, leaf) in _flatten(per_block).items()}
  covered = {e.ours for e in layout}
  if covered != set(shapes):  # The table above and models/ disagree: a bug here, not bad input.
    raise RuntimeError(
        f"official_layout is out of date with the model: only ours {sorted(set(shapes) - covered)}"
        f", only in the layout {sorted(covered - set(shapes))}")
  return layout, shapes


# Import.


def _to_numpy(value: Any) -> Any:
  """torch tensors (duck-typed) to NumPy, bfloat16 kept as ml_dtypes.bfloat16; other values unchanged."""
  if hasattr(value, "detach") and hasattr(value, "numpy"):
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
      import torch  # pylint: disable=import-outside-toplevel  (only reached with torch tensors)
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
      return tensor.numpy()
    except TypeError:  # A dtype NumPy lacks (e.g. float8): go through float32.
      return tensor.float().numpy()
  return value


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops DDP's `module.` and torch.compile's `_orig_mod.` key prefixes (any number, any order)."""
  out = {}
  for key, value in state_dict.items():
    name = str(key)
    while name.startswith(_PREFIXES):
      name = name.split(".", 1)[1]
    if name in out:
      raise ValueError(f"state dict has key {name!r} twice once the module./_orig_mod. prefixes are removed")
    out[name] = value
  return out


def import_official(state_dict: Mapping[str, Any],
                    model_config: ml_collections.ConfigDict | Mapping[str, Any]) -> nnx.State:
  """Converts an official state dict into the full nnx.State of the model `model_config` describes.

  Every key is checked first; missing keys, unexpected keys, shape mismatches and non-tensor values are
  reported together in one ValueError. Values are cast to our parameter dtype (float32).
  """
  cfg = resolve_model_config(model_config)
  layout, shapes = _layout_and_shapes(cfg)
  sd = strip_prefixes({k: _to_numpy(v) for k, v in state_dict.items()})
  by_path: dict[str, list[Entry]] = defaultdict(list)
  for entry in layout:
    by_path[entry.ours].append(entry)
  values, missing, bad, used = {}, [], [], set()
  for path, entries in by_path.items():
    target = shapes[path]
    present = [e for e in entries if e.torch_key in sd]
    if not present:
      missing.append(" or ".join(e.torch_key for e in entries))
    for entry in present:
      used.add(entry.torch_key)
      value = sd[entry.torch_key]
      expected = _torch_shape(entry.kind, tuple(target.shape), cfg.patch_size)
      if not isinstance(value, np.ndarray) or value.dtype == object:
        bad.append(f"{entry.torch_key}: not a tensor ({type(value).__name__})")
      elif tuple(value.shape) != expected:
        bad.append(f"{entry.torch_key}: shape {tuple(value.shape)}, expected {expected}")
      else:
        converted = _from_torch(entry.kind, value, tuple(target.shape)).astype(target.dtype)
        if path in values and not np.array_equal(values[path], converted):
          bad.append(f"{entry.torch_key}: differs from {present[0].torch_key} (the same tensor officially)")
        values.setdefault(path, converted)
  unexpected = sorted(set(sd) - used)
  if missing or unexpected or bad:
    parts = [f"the state dict does not fit {_describe(cfg)}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("bad tensors", bad)):
      if items:
        parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) +
                     (" ..." if len(items) > 20 else ""))
    parts.append("  (wrong model name, input size, num_classes, learn_sigma, dwconv or norm? "
                 "infer_config_overrides(state_dict, patch_size) reads all but the name from the checkpoint)")
    raise ValueError("\n".join(parts))
  pure = nnx.to_pure_dict(abstract_state(_per_block(cfg)))
  for path, (keys, _) in _flatten(pure).items():
    node = pure
    for key in keys[:-1]:
      node = node[key]
    node[keys[-1]] = jnp.asarray(values[path])
  state = abstract_state(cfg)
  nnx.replace_by_pure_dict(state, stack_block_params(pure, cfg.depth) if cfg.stack_blocks else pure)
  return state


def load_into_model(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
  """Loads an official state dict into `model` in place (same shardings as before); untouched on any error."""
  new = nnx.to_pure_dict(import_official(state_dict, model.config))
  current = nnx.state(model)
  old = nnx.to_pure_dict(current)
  placed = jax.tree.map(lambda n, o: jax.device_put(n.astype(o.dtype), getattr(o, "sharding", None)),
                        new, old)
  nnx.replace_by_pure_dict(current, placed)
  nnx.update(model, current)
  return model


def _describe(cfg: ml_collections.ConfigDict) -> str:
  name = "DiG" if cfg.arch == "dig" else "DiT"
  return (f"{name}-{cfg.size}/{cfg.patch_size} (depth {cfg.depth}, hidden {cfg.hidden_size}, "
          f"input {cfg.input_size}, in_channels {cfg.in_channels}, num_classes {cfg.num_classes}, "
          f"learn_sigma {cfg.learn_sigma}, dwconv {cfg.dwconv!r}, norm {cfg.norm!r})")


def infer_config_overrides(state_dict: Mapping[str, Any], patch_size: int) -> dict[str, Any]:
  """Model-config fields a checkpoint determines (a name like "DiG-XL/2" gives the rest, heads included)."""
  sd = strip_prefixes(state_dict)
  out: dict[str, Any] = {}
  if "pos_embed" in sd:
    edge = math.isqrt(int(sd["pos_embed"].shape[1]))
    if edge * edge != sd["pos_embed"].shape[1]:
      raise ValueError(f"pos_embed has {sd['pos_embed'].shape[1]} tokens, not a square grid")
    out["input_size"] = edge * patch_size
  if "x_embedder.proj.weight" in sd:
    out["in_channels"] = int(sd["x_embedder.proj.weight"].shape[1])
  if "y_embedder.embedding_table.weight" in sd:
    out["num_classes"] = int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1
  if "final_layer.linear.weight" in sd and "in_channels" in out:
    out["learn_sigma"] = sd["final_layer.linear.weight"].shape[0] == 2 * out["in_channels"] * patch_size**2
    out_channels = out["in_channels"] * (2 if out["learn_sigma"] else 1)
    if out_channels < 3:  # The official CFG guides output channels [:3], i.e. all of them here.
      out["cfg_channels"] = out_channels
  if any(k.startswith("blocks.0.attn.q_proj") for k in sd):  # DiG
    out["dwconv"] = "identity" if "blocks.0.dw_conv.weight" in sd else "off"
  if "blocks.0.norm1.weight" in sd or "blocks.0.attn_norm.weight" in sd:
    out["norm"] = "rmsnorm"
  return out


# Export.


def export_official(
    model_or_state: Any,
    model_config: ml_collections.ConfigDict | Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Our parameters -> the official state dict (keys, order and NCHW/OIHW layouts of `model.state_dict()`).

  Accepts a model, its nnx.State or a pure dict ({**params, **model_state} of a train state); model_config is
  needed unless a model is given. A missing pos_embed is rebuilt from the sin-cos formula (it is fixed).
  """
  if model_config is None:
    if not isinstance(model_or_state, nnx.Module):
      raise ValueError("export_official needs model_config unless it is given the model itself")
    model_config = model_or_state.config
  cfg = resolve_model_config(model_config)
  layout, shapes = _layout_and_shapes(cfg)
  tree = _values(_pure(model_or_state))
  if cfg.stack_blocks and "blocks" in tree:
    tree = unstack_block_params(tree)
  flat = {path: leaf for path, (_, leaf) in _flatten(tree).items()}
  if "pos_embed" not in flat:
    rows, cols = (cfg.input_size,) * 2 if isinstance(cfg.input_size, int) else cfg.input_size
    flat["pos_embed"] = sincos_2d_table(cfg.hidden_size, rows // cfg.patch_size,
                                        cols // cfg.patch_size)[None].astype(np.float32)
  missing, unexpected = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
  wrong = [
      f"{p}: {tuple(np.shape(flat[p]))} != {tuple(shapes[p].shape)}" for p in sorted(set(flat) & set(shapes))
      if tuple(np.shape(flat[p])) != tuple(shapes[p].shape)
  ]
  if missing or unexpected or wrong:
    raise ValueError(f"parameters do not fit {_describe(cfg)}: missing {missing}, unexpected {unexpected}, "
                     f"wrong shapes {wrong}")
  out = {}
  for entry in layout:
    value = np.asarray(flat[entry.ours])
    out[entry.torch_key] = np.array(_to_torch(entry.kind, value, cfg.patch_size), order="C")  # own, writable
  return out


# Files.


def _torch_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def _torch_load(path: str) -> Any:
  """torch.load with weights_only=True (argparse.Namespace allowed), tensors turned into NumPy arrays."""
  import torch  # pylint: disable=import-outside-toplevel
  safe = getattr(torch.serialization, "safe_globals", None)
  with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
    obj = torch.load(path, map_location="cpu", weights_only=True)

  def walk(x):
    if isinstance(x, dict):  # dict or OrderedDict
      return type(x)((k, walk(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
      return type(x)(walk(v) for v in x)
    return _to_numpy(x)

  return walk(obj)


def _read_torch_file(path: str, reader: str) -> Any:
  if reader not in ("auto", "torch", "builtin"):
    raise ValueError(f"reader must be 'auto', 'torch' or 'builtin'; got {reader!r}")
  use_torch = reader == "torch" or (reader == "auto" and _torch_available())
  if not use_torch:
    return torch_files.read_torch_zip(path)
  torch_files.check_zip_crcs(path)  # torch.load does not check them: a flipped byte would load silently.
  try:
    return _torch_load(path)
  except pickle.UnpicklingError as e:
    # weights_only refused a class (say, in "args"): our reader turns it into an inert stub instead.
    if reader == "auto" and zipfile.is_zipfile(path):
      return torch_files.read_torch_zip(path)
    raise CheckpointFormatError(f"cannot read torch checkpoint {path}: {e}") from e
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise CheckpointFormatError(f"cannot read torch checkpoint {path} (corrupt or truncated?): {e}") from e


def load_torch_state_dict(path: str | os.PathLike[str],
                          which: str = "ema",
                          reader: str = "auto") -> dict[str, np.ndarray]:
  """{key: array} from an official checkpoint file, `module.`/`_orig_mod.` prefixes removed.

  Args:
    path: .safetensors, or a torch.save file (.pt/.pth/.bin/.ckpt): a bare state dict, or a training
      checkpoint {"model", "ema", "opt", "args"} (DiT/DiG train scripts), from which `which` is picked.
    which: "ema" (default: the weights the official scripts sample with) or "model".
    reader: "auto" (torch if importable, else the built-in torch-free reader), "torch" or "builtin".
  """
  path = torch_files.check_exists(path)
  if path.endswith(".safetensors"):
    return strip_prefixes(torch_files.read_safetensors(path))
  obj = _read_torch_file(path, reader)
  if isinstance(obj, Mapping) and ("ema" in obj or "model" in obj or "state_dict" in obj):
    if which not in ("ema", "model"):
      raise ValueError(f"which must be 'ema' or 'model'; got {which!r}")
    if which not in obj and "state_dict" in obj:
      obj = obj["state_dict"]
    elif which not in obj:
      raise ValueError(f"{path} has no {which!r} entry (it has {sorted(map(str, obj))}); pass which=...")
    else:
      obj = obj[which]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
  not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if not_tensors:
    raise ValueError(f"{path} is not a state dict: entries {not_tensors[:10]} are not tensors")
  return strip_prefixes(obj)


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
  """Writes .safetensors (no dependency) or, with torch installed, .pt/.pth/.bin (torch.save of tensors)."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    torch_files.write_safetensors(state_dict, path)
    return
  if not path.endswith(TORCH_SUFFIXES):
    raise ValueError(f"unknown checkpoint suffix for {path!r}; use .safetensors or one of {TORCH_SUFFIXES}")
  if not _torch_available():
    raise ValueError(f"writing {path!r} needs PyTorch (pip install torch); .safetensors works without it")
  import torch  # pylint: disable=import-outside-toplevel

  def tensor(a: np.ndarray):
    a = np.asarray(a, order="C")
    if a.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())

  torch.save({k: tensor(v) for k, v in state_dict.items()}, path)


# CLI.


def _cmd_import(args: argparse.Namespace) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  sd = load_torch_state_dict(args.checkpoint, which=args.which)
  base = model_config_for(args.model)
  overrides = infer_config_overrides(sd, base.patch_size)
  try:
    overrides.update(json.loads(args.overrides))
  except (json.JSONDecodeError, TypeError) as e:
    raise ValueError(
        f"--overrides must be a JSON object of model-config fields; got {args.overrides!r}") from e
  cfg = model_config_for(args.model, **overrides)
  state = import_official(sd, cfg)
  params, rest = nnx.split_state(state, nnx.Param, ...)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  tree = {"params": nnx.to_pure_dict(params), "model_state": nnx.to_pure_dict(rest)}
  checkpointer.save(os.path.join(out, IMPORTED_PARAMS_DIR), tree, force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(out, IMPORTED_CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(cfg.to_json(indent=2, sort_keys=True))
  print(f"imported {len(sd)} tensors into {_describe(cfg)}; wrote {out}/{IMPORTED_PARAMS_DIR} and "
        f"{out}/{IMPORTED_CONFIG_FILE}")


def _read_imported_config(folder: str) -> ml_collections.ConfigDict:
  with open(os.path.join(folder, IMPORTED_CONFIG_FILE), encoding="utf-8") as f:
    return resolve_model_config(json.load(f))


def _restore_imported(folder: str, params: Any, model_state: Any) -> tuple[Any, Any]:
  """(params, model_state) of an `import` folder, restored into the given targets' structure and shardings."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  target = {"params": params, "model_state": model_state}
  restored = ocp.StandardCheckpointer().restore(os.path.join(folder, IMPORTED_PARAMS_DIR), target)
  return restored["params"], restored["model_state"]


def load_imported(folder: str | os.PathLike[str], model_config: Any, abstract_params: Any,
                  abstract_model_state: Any) -> tuple[Any, Any]:
  """(params, model_state) of a folder written by `import` for a run with `model_config` (config.init_from).

  The architecture fields of the folder's model config must match the run's; the arrays are restored straight
  into the shardings of ``abstract_params`` / ``abstract_model_state`` (shape-dtype structs).

  Raises:
    FileNotFoundError: the folder or its files are missing.
    ValueError: the architectures differ (the message lists the fields and the overrides that would match).
    RuntimeError: the parameter files do not load (corrupt or truncated).
  """
  folder = os.path.abspath(os.fspath(folder))
  params_path = os.path.join(folder, IMPORTED_PARAMS_DIR)
  if not (os.path.isfile(os.path.join(folder, IMPORTED_CONFIG_FILE)) and os.path.isdir(params_path)):
    raise FileNotFoundError(
        f"config.init_from={folder} must be a folder written by `python -m dig_jax.convert import "
        f"--checkpoint=<official .pt> --model=<name> --out=<folder>` ({IMPORTED_CONFIG_FILE} + "
        f"{IMPORTED_PARAMS_DIR}/); not found")
  theirs, ours = _read_imported_config(folder), resolve_model_config(model_config)
  differing = [name for name in ARCHITECTURE_FIELDS if theirs[name] != ours[name]]
  if differing:
    wanted = " ".join(f"--config.model.{name}={theirs[name]}" for name in differing)
    raise ValueError(
        f"config.init_from={folder} holds a different model: "
        + ", ".join(f"{name} {theirs[name]!r} (run: {ours[name]!r})" for name in differing)
        + f". Match it with: {wanted}")
  try:
    if theirs.stack_blocks == ours.stack_blocks:
      return _restore_imported(folder, abstract_params, abstract_model_state)
    return _restore_other_layout(folder, theirs, abstract_params, abstract_model_state)
  except Exception as e:  # orbax raises many types for unreadable data
    raise RuntimeError(f"could not load the parameters in {params_path} ({type(e).__name__}: "
                       f"{str(e)[:300]}); re-run `python -m dig_jax.convert import`") from e


def _restore_other_layout(folder: str, theirs: ml_collections.ConfigDict, abstract_params: Any,
                          abstract_model_state: Any) -> tuple[Any, Any]:
  """Restores a folder whose blocks are (un)stacked unlike the run's, then converts and places the arrays.

  The folder's arrays are restored replicated on the run's mesh, (un)stacked, then put on the run's shardings.
  """
  their_params, their_rest = nnx.split_state(abstract_state(theirs), nnx.Param, ...)
  run_sharding = jax.tree.leaves(abstract_params)[0].sharding
  replicated = (jax.sharding.NamedSharding(run_sharding.mesh, jax.sharding.PartitionSpec())
                if isinstance(run_sharding, jax.sharding.NamedSharding) else run_sharding)
  as_target = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), nnx.to_pure_dict(tree))
  params, rest = _restore_imported(folder, as_target(their_params), as_target(their_rest))
  params = (unstack_block_params(params) if theirs.stack_blocks
            else stack_block_params(params, theirs.depth))
  place = lambda values, targets: jax.tree.map(  # noqa: E731
      lambda v, t: jax.device_put(jnp.asarray(v, t.dtype), t.sharding), values, targets)
  return place(params, abstract_params), place(rest, abstract_model_state)


def _load_workdir(workdir: str, step: int | None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(model config, {**params, **model_state}) from a training workdir or an `import` output folder."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, IMPORTED_CONFIG_FILE)):
    cfg = _read_imported_config(workdir)
    params, rest = nnx.split_state(abstract_state(cfg), nnx.Param, ...)
    params, rest = _restore_imported(workdir, nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
    return cfg, {**params, **rest}
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(
        f"{workdir} is neither a training workdir (config.json + checkpoints/) nor a folder "
        "written by `python -m dig_jax.convert import` (model_config.json + params/)")
  from dig_jax import sample  # pylint: disable=import-outside-toplevel  (heavy; only this path needs it)
  restored = sample.load_ema_params(workdir, step)
  print(f"exporting the EMA parameters of step {restored.step}")
  return resolve_model_config(restored.config.model), {**restored.ema_params, **restored.model_state}


def _cmd_export(args: argparse.Namespace) -> None:
  cfg, tree = _load_workdir(args.workdir, args.step)
  sd = export_official(tree, cfg)
  save_torch_state_dict(sd, args.out)
  print(f"wrote {len(sd)} tensors of {_describe(cfg)} to {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m dig_jax.convert", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="official .pt/.safetensors -> orbax params")
  imp.add_argument("--checkpoint", required=True, help=".pt/.pth/.bin/.safetensors file")
  imp.add_argument("--model", required=True, help='e.g. "DiG-XL/2", "DiT-XL/2"')
  imp.add_argument("--out", required=True, help="output folder (params/ + model_config.json)")
  imp.add_argument("--which", default="ema", choices=("ema", "model"), help="entry of a training checkpoint")
  imp.add_argument(
      "--overrides",
      default="{}",
      help='model-config fields as JSON, e.g. \'{"gla_impl": "chunked"}\' (input_size, in_channels, '
      'num_classes, learn_sigma, dwconv and norm are read from the file)')
  exp = commands.add_parser("export", help="training workdir (EMA) or import folder -> official state dict")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--out", required=True, help="file.safetensors (or .pt with torch installed)")
  exp.add_argument("--step", type=int, default=None, help="training step (default: newest)")
  args = parser.parse_args(argv)
  try:
    (_cmd_import if args.command == "import" else _cmd_export)(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e


if __name__ == "__main__":
  main()
