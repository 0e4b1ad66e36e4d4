#!/usr/bin/env bash
# The causal test of the 256 px compile lottery (benchmarks/NOTES.md, "H100 (session 16)"): DiG-S/2 at 256 px
# with XLA's cuDNN depthwise conv, compiled once to dump XLA's autotune results, then compiled afresh with
# those results loaded: the conv's entry edited to cuDNN algorithm ALGO (default 0), unedited (the control),
# and edited again, so that the programs differ in the conv's algorithm alone. Prints each run's table and
# the cuDNN algorithms in its optimised training step. GPU only; run from the repository root:
#   bash benchmarks/dwconv_force_algorithm.sh [ALGO]
# Results: model_sweep_<card>_<FORCE_TAG>_*.json in $OUT, else benchmarks/results (model_sweep's --out_dir).
set -euo pipefail
algo=${1:-0}
FORCE_TAG=${FORCE_TAG:-force}   # the result files: model_sweep_<card>_<FORCE_TAG>_*.json
cell=DiG-S/2:256:bf16:dwconv_impl=conv
tmp=$(mktemp -d)
export PYTHONUNBUFFERED=1
sweep() { python3 -m benchmarks.model_sweep --extra "$cell" --no_sweep --jobs 0 --cache_dir= --tag "$1"; }

XLA_FLAGS="--xla_gpu_dump_autotune_results_to=$tmp/at.textproto" sweep ${FORCE_TAG}_dump
python3 -m benchmarks.dwconv_autotune --force_algorithm "$algo" --results "$tmp/at.textproto.train" \
  --out "$tmp/forced.textproto"
run=0
for results in forced at.textproto.train forced; do
  run=$((run + 1))
  [ "$results" = forced ] && file=$tmp/forced.textproto name=algo$algo || file=$tmp/$results name=control
  dump=$tmp/dump_$run
  flags="--xla_gpu_load_autotune_results_from=$file --xla_dump_to=$dump"
  XLA_FLAGS="$flags --xla_dump_hlo_module_re=.*train_step.*" sweep "${FORCE_TAG}_${run}_$name"
  python3 - "$dump" <<'PY'
import collections, glob, sys
from benchmarks import hlo_decisions
for path in sorted(glob.glob(sys.argv[1] + "/*train_step*after_optimizations.txt")):
  with open(path, encoding="utf-8") as f:
    found = hlo_decisions.decisions(f.read()).values()
  print("conv algorithms in the training step:",
        dict(collections.Counter(f"{d.kind}: {d.choice}" for d in found if d.kind.startswith("__cudnn"))))
PY
done
rm -rf "$tmp"
