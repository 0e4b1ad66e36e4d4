"""The compiler's choices in an optimised XLA:GPU module, and how two compilations of one program differ.

Why: in session 14 (H200, benchmarks/NOTES.md) DiG-S/2's 256 px training step, compiled afresh in separate
processes from the same code, came out 1.46x slower to train (1.86x slower to sample) in 2 of 7
compilations. XLA:GPU decides parts of the program by timing candidates on the GPU while it compiles:
which cuBLAS algorithm runs a GEMM (``selected_algorithm`` in a ``__cublas$lt$matmul`` custom call's
backend config), whether a fusion runs on the Triton emitter and with which output tiles, warps, stages and
TMA (the ``block_level_fusion_config`` of a fusion whose kind is ``__triton...``) or as a native loop /
reduction fusion, and the cuDNN algorithm of a convolution. Those choices are written in the optimised
module's text (``compiled.as_text()``; ``model_sweep`` saves it with a cell's ``hlo_path``). This module
reads them per instruction and lists the instructions whose choice differs between two modules, named by
their JAX name stack and sized by their output bytes, so a fast and a slow program can be compared on what
the compiler chose instead of guessed at. Four fast compilations of that step already differed in 65-87
choices (mostly small reductions), so a difference is a lead, not a verdict: the per-op trace of both
programs says which ones cost time.

``python -m benchmarks.hlo_decisions FAST.txt[.gz] SLOW.txt[.gz] [--top N]``
"""
from __future__ import annotations

import argparse
import collections
import gzip
import re
from typing import Any, NamedTuple

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
                "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "c64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_OPCODE = re.compile(r"\s(fusion|custom-call)\(")


class Decision(NamedTuple):
  """One instruction's compiler choice: `kind` (fusion kind or custom-call target) and `choice` (its text)."""
  kind: str
  choice: str
  op_name: str    # the JAX name stack from the instruction's metadata ("" if none)
  out_bytes: int  # size of the instruction's result (a rough weight: what it writes)


def _shape_bytes(shape_text: str, first_only: bool = False) -> int:
  """Bytes of the arrays in a result shape; `first_only`: of its first array (a custom call's result, without
  the scratch workspace that cuBLAS calls return beside it)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text)[:1 if first_only else None]:
    if dtype in _DTYPE_BYTES:
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      total += count * _DTYPE_BYTES[dtype]
  return total


def _field(text: str, name: str) -> str | None:
  m = re.search(rf'"{name}":"?([\w.\-]+)"?', text)
  return m.group(1) if m else None


def _block_level_choice(config: str) -> str:
  tiles = ";".join("x".join(re.findall(r'"(\d+)"', t)) or "scalar"
                   for t in re.findall(r'\{"sizes":\[([^\]]*)\]\}', config))
  parts = [f"tiles={tiles}"] + [f"{short}={_field(config, name)}" for name, short in
                                (("num_warps", "warps"), ("num_stages", "stages"), ("num_ctas", "ctas"))]
  parts.append("tma" if _field(config, "is_tma_allowed") == "true" else "no-tma")
  return " ".join(parts)


def decision_of(rest: str) -> Decision | None:
  """The Decision of one instruction (the text after "%name = "), or None if it is no fusion / custom call."""
  opcode = _OPCODE.search(rest)
  if not opcode:
    return None
  shape_text = rest[:opcode.start()]
  op_name = re.search(r'op_name="([^"]*)"', rest)
  backend = rest[rest.find("backend_config="):] if "backend_config=" in rest else ""
  if opcode.group(1) == "custom-call":
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    kind = target.group(1) if target else "?"
    if "gemm_backend_config" in backend:
      choice = f"algorithm {_field(backend, 'selected_algorithm')}"
    elif "cudnn_conv_backend_config" in backend:
      choice = f"algo_id {_field(backend, 'algo_id')}"
    else:
      choice = "fixed"  # e.g. a Pallas kernel: its launch parameters are the kernel's own, not autotuned
  else:
    fusion_kind = _field(backend, "kind") if "fusion_backend_config" in backend else None
    if fusion_kind:
      kind = fusion_kind
      config = re.search(r'"(?:block_level_fusion_config|triton_gemm_config)":(\{.*?\})(?:,"kind"|\})',
                         backend)
      choice = _block_level_choice(config.group(1)) if config else "default"
    else:
      native = re.search(r"kind=(k\w+)", rest)
      kind, choice = "native", native.group(1) if native else "?"
  return Decision(kind, choice, op_name.group(1) if op_name else "",
                  _shape_bytes(shape_text, first_only=opcode.group(1) == "custom-call"))


def decisions(hlo_text: str) -> dict[str, Decision]:
  """Instruction name -> Decision for every fusion and custom call of an optimised HLO module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      d = decision_of(m.group(2))
      if d is not None:
        out[m.group(1)] = d
  return out


def _category(a: Decision, b: Decision) -> str:
  if a.kind != b.kind:
    return "emitter" if "native" in (a.kind, b.kind) or "triton" in a.kind + b.kind else "kind"
  if a.kind.startswith("__cublas"):
    return "cublas algorithm"
  if a.kind.startswith("__cudnn"):
    return "cudnn algorithm"
  return "triton config" if "triton" in a.kind else "other"


def compare(first: dict[str, Decision], second: dict[str, Decision]) -> dict[str, Any]:
  """How two modules' choices differ: counts per category and the differing instructions, largest first."""
  common = first.keys() & second.keys()
  changed = [(name, first[name], second[name]) for name in common
             if (first[name].kind, first[name].choice) != (second[name].kind, second[name].choice)]
  changed.sort(key=lambda t: (-max(t[1].out_bytes, t[2].out_bytes), t[0]))
  counts = collections.Counter(_category(a, b) for _, a, b in changed)
  return {
      "instructions": [len(first), len(second)],
      "only_in_first": sorted(first.keys() - second.keys()),
      "only_in_second": sorted(second.keys() - first.keys()),
      "changed_by_category": dict(counts.most_common()),
      "changed": [dict(name=n, first=f"{a.kind}: {a.choice}", second=f"{b.kind}: {b.choice}",
                       out_bytes=max(a.out_bytes, b.out_bytes), op_name=a.op_name or b.op_name)
                  for n, a, b in changed],
  }


def read_text(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return f.read()


def format_comparison(result: dict[str, Any], names: tuple[str, str], top: int = 30) -> str:
  lines = [f"instructions with a choice: {result['instructions'][0]} ({names[0]}) vs "
           f"{result['instructions'][1]} ({names[1]}); only in one: {len(result['only_in_first'])} / "
           f"{len(result['only_in_second'])}",
           "changed choices by category: " + (", ".join(f"{k} {v}" for k, v in
                                                      result["changed_by_category"].items()) or "none")]
  for c in result["changed"][:top]:
    lines.append(f"  {c['out_bytes'] / 2**20:8.2f} MiB  {c['name'][:36]:36s} {c['first']}  ->  {c['second']}")
    lines.append(f"  {'':12s}{c['op_name'][-120:]}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("first", help="optimised HLO text of one compilation (.txt or .txt.gz)")
  parser.add_argument("second", help="the same program compiled again")
  parser.add_argument("--top", type=int, default=30, help="differing instructions to list, largest first")
  args = parser.parse_args()
  result = compare(decisions(read_text(args.first)), decisions(read_text(args.second)))
  print(format_comparison(result, (args.first, args.second), args.top))


if __name__ == "__main__":
  main()
