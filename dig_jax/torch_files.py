"""PyTorch checkpoint files without PyTorch: the torch.save zip format and safetensors.

Why: official DiG/DiT checkpoints are `torch.save` files, but torch is not a dependency of this project (and
`torch.load(weights_only=False)` would run whatever code the pickle names). So:

- `read_torch_zip(path)` reads the zip format that `torch.save` writes since PyTorch 1.6 (`<archive>/data.pkl`
  plus one raw little-endian file per storage, `<archive>/data/<key>`) with a *restricted* unpickler. Tensors
  come back as NumPy arrays (`torch._utils._rebuild_tensor_v2` and friends; Float, Half, BFloat16, Double,
  Long, Int, Short, Char, Byte, Bool and Complex storages); `collections.OrderedDict`, `argparse.Namespace`
  and a few builtin containers are allowed; every other class the pickle names (an optimizer's or a launcher's
  objects) becomes an inert `PickledObject` stub that only records its arguments. Nothing is imported or run.
- `read_safetensors(path)` / `write_safetensors(tensors, path)`: 8-byte little-endian header length, a JSON
  header {name: {dtype, shape, data_offsets}}, then the raw row-major bytes. Parsed here directly: it is a few
  lines and spares a dependency.

bfloat16 is `ml_dtypes.bfloat16` (installed with jax). Corrupt or truncated files raise one ValueError
(`CheckpointFormatError`) naming the file; a missing file raises FileNotFoundError. Legacy (pre-1.6, non-zip)
torch files and TorchScript archives are not read here (`dig_jax.convert` hands legacy files to torch when it
is installed).
"""
from __future__ import annotations

import argparse
import builtins
import collections
import json
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

PathLike = str | os.PathLike[str]

# torch storage class name -> NumPy dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# safetensors dtype tag <-> NumPy dtype.
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_TAGS = {dtype: tag for tag, dtype in _SAFETENSORS_DTYPES.items()}


class CheckpointFormatError(ValueError):
  """A checkpoint file that cannot be read (corrupt, truncated or of an unsupported kind)."""


def check_exists(path: PathLike) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist (give the path to a .pt/.pth/.bin or "
                            ".safetensors file)")
  return path


# ------------------------------------------------------------------------------------------------------------
# torch zip format


class PickledObject:
  """Inert stand-in for a class the restricted unpickler does not know; keeps what the pickle gave it."""

  def __init__(self, *args: Any, **kwargs: Any):
    self.args = args
    self.kwargs = kwargs
    self.state: Any = None

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f"<pickled {type(self).__module__}.{type(self).__qualname__}>"


_STUB_CLASSES: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _STUB_CLASSES:
    _STUB_CLASSES[key] = type(name, (PickledObject,), {"__module__": module, "__qualname__": name})
  return _STUB_CLASSES[key]


class _StorageType:
  """What `torch.<X>Storage` resolves to while unpickling: the element dtype of a storage."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES.get(name)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Any, stride: Any, *unused: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2): a strided view of a storage, copied out as a NumPy array."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError("tensor without a storage")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"tensor (offset {offset}, size {size}, stride {stride}) reads past its "
                                 f"storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:],
                                         shape=size,
                                         strides=tuple(s * storage.itemsize for s in stride),
                                         writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  return data


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: tuple, state: Any) -> Any:
  del new_type, state  # a tensor subclass (e.g. nn.Parameter) becomes a plain array
  return func(*args)


def _codecs_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
  return text.encode(encoding, errors)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): lambda dims=(): tuple(dims),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("_codecs", "encode"): _codecs_encode,
    **{("builtins", name): getattr(builtins, name)
       for name in ("set", "frozenset", "list", "tuple", "dict", "complex", "bytearray", "slice", "range")},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles torch's data.pkl: known tensor builders and containers only, stubs for everything else."""

  def __init__(self, file: Any, load_storage: Callable[[np.dtype, str, int], np.ndarray]):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    return _stub_class(module, name)

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType) or storage_type.dtype is None:
      name = getattr(storage_type, "name", storage_type)
      raise pickle.UnpicklingError(f"unsupported storage type {name!r}")
    return self._load_storage(storage_type.dtype, str(key), int(numel))


def _archive_prefix(names: list[str], path: str) -> str:
  pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if any(n.split("/", 1)[-1].startswith("code/") for n in names) and not pickles:
    raise CheckpointFormatError(f"{path} is a TorchScript archive, not a saved state dict")
  if len(pickles) != 1:
    raise CheckpointFormatError(f"{path} is a zip file but not a torch.save checkpoint (expected one "
                                f"<archive>/data.pkl entry, found {len(pickles)})")
  return pickles[0][:-len("data.pkl")]


def check_zip_crcs(path: PathLike) -> None:
  """Raises CheckpointFormatError if a member of a zip-format file fails its CRC-32 check (else a no-op)."""
  path = check_exists(path)
  if not zipfile.is_zipfile(path):
    return
  try:
    with zipfile.ZipFile(path) as archive:
      bad = archive.testzip()
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CheckpointFormatError(f"cannot read torch checkpoint {path} (corrupt or truncated?): {e}") from e
  if bad is not None:
    raise CheckpointFormatError(f"torch checkpoint {path} is corrupt: member {bad} fails its CRC check")


def read_torch_zip(path: PathLike) -> Any:
  """Loads a torch.save (zip format) file without torch: Python containers, NumPy arrays for tensors."""
  path = check_exists(path)
  if not zipfile.is_zipfile(path):
    raise CheckpointFormatError(
        f"{path} is not a zip-format torch checkpoint (truncated or corrupt, or saved with "
        "_use_new_zipfile_serialization=False: that legacy format needs PyTorch installed)")
  try:
    with zipfile.ZipFile(path) as archive:
      prefix = _archive_prefix(archive.namelist(), path)
      byteorder = "little"
      if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}byteorder").decode().strip()
      storages: dict[str, np.ndarray] = {}

      def load_storage(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
        if key not in storages:
          raw = archive.read(f"{prefix}data/{key}")
          file_dtype = dtype.newbyteorder(">" if byteorder == "big" else "<") if dtype.itemsize > 1 else dtype
          if len(raw) < numel * dtype.itemsize:
            raise CheckpointFormatError(f"storage {key} holds {len(raw)} bytes, expected "
                                        f"{numel * dtype.itemsize}")
          storages[key] = np.frombuffer(raw, file_dtype, count=numel).astype(dtype, copy=False)
        return storages[key]

      with archive.open(f"{prefix}data.pkl") as pkl:
        return _RestrictedUnpickler(pkl, load_storage).load()
  except CheckpointFormatError as e:
    raise CheckpointFormatError(f"cannot read {path}: {e}") from e
  except (zipfile.BadZipFile, KeyError, EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError,
          AttributeError, IndexError, struct.error) as e:
    raise CheckpointFormatError(f"cannot read torch checkpoint {path} (corrupt or truncated?): "
                                f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors file (checked: header, dtypes, offsets inside the file)."""
  path = check_exists(path)
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointFormatError("file shorter than the 8-byte header length")
      (header_len,) = struct.unpack("<Q", head)
      if header_len > size - 8:
        raise CheckpointFormatError(f"header length {header_len} exceeds the file size {size}")
      header = json.loads(f.read(header_len).decode("utf-8"))
    if not isinstance(header, dict):
      raise CheckpointFormatError("header is not a JSON object")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start,
                    shape=(data_len,)) if data_len else None
    tensors = {}
    for name, entry in header.items():
      if name == "__metadata__":
        continue
      dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
      if dtype is None:
        raise CheckpointFormatError(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
      shape = tuple(int(s) for s in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
      if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointFormatError(f"tensor {name!r} ({entry['dtype']} {list(shape)}) has bad data offsets "
                                    f"[{begin}, {end}) for a data section of {data_len} bytes")
      chunk = raw[begin:end] if end > begin else np.zeros(0, np.uint8)
      tensors[name] = np.array(chunk).view(dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    del raw
    return tensors
  except CheckpointFormatError as e:
    raise CheckpointFormatError(f"cannot read safetensors file {path}: {e}") from e
  except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
    raise CheckpointFormatError(f"cannot read safetensors file {path} (corrupt or truncated?): "
                                f"{type(e).__name__}: {e}") from e


def write_safetensors(tensors: Mapping[str, np.ndarray],
                      path: PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes {name: array} as .safetensors (tensors in the given order, header padded to 8 bytes)."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  arrays, offset = [], 0
  for name, value in tensors.items():
    array = np.asarray(value, order="C")
    tag = _SAFETENSORS_TAGS.get(array.dtype.newbyteorder("="))
    if tag is None:
      raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent")
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    header[name] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
    arrays.append(array)
    offset += array.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays:
      f.write(array.tobytes())
  os.replace(tmp, path)
