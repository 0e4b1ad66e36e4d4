#!/bin/bash
# Recipe probes for the CPU demo, run on a GPU because each probe is ~1 min there vs ~10 min on 2 CPU cores:
# `OUT=/tmp/out bash benchmarks/demo_recipe_probes.sh`. Each probe is benchmarks/demo_quality.py with
# --override flags on top of configs/demo.py; three run at once on one GPU. The classifier is trained by the first
# probe and cached. Results of the session-2 run (H100, on the session-1 demo config): demo_sweep_h100.json.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=.12
OUTD=${OUT:-/tmp/out}/demo; mkdir -p $OUTD
run() {  # name, overrides...
  local name=$1; shift
  local ov=(); for o in "$@"; do ov+=("--override=config.$o"); done
  local t0=$(date +%s)
  timeout ${VARIANT_TIMEOUT:-300} python -m benchmarks.demo_quality --workdir=/tmp/wd_$name --overwrite \
    --classifier_cache=/tmp/clf.npz --out_json=$OUTD/$name.json --grid_png=$OUTD/$name.png "${ov[@]}" \
    > $OUTD/$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s $(python -c "
import json;d=json.load(open('$OUTD/$name.json'));s=d['scoring']
print('acc', round(s['generated_class_accuracy'],3), 'fid', round(s['fid_generated_vs_test'],1), 'train_s', round(d['training']['train_wall_s']))" 2>&1 | tail -1) :: $*"
}
M=min_snr_gamma
run base
run base6k num_train_steps=6000 &
run snr5 diffusion.$M=5 &
run snr5_nosig diffusion.$M=5 model.learn_sigma=False &
wait
run snr5_cos diffusion.$M=5 diffusion.noise_schedule=squaredcos_cap_v2 &
run p8w128d6_snr5 diffusion.$M=5 model.patch_size=8 model.hidden_size=128 model.depth=6 num_train_steps=3800 &
run p8w192d6_snr5 diffusion.$M=5 model.patch_size=8 model.hidden_size=192 model.depth=6 model.num_heads=3 num_train_steps=2300 &
wait
run snr5_6k diffusion.$M=5 num_train_steps=6000 &
run snr5_lr2e3 diffusion.$M=5 optim.learning_rate=2e-3 &
run snr5_b64 diffusion.$M=5 input.batch_size=64 num_train_steps=1000 &
wait
run p8w128d6_snr5_12k diffusion.$M=5 model.patch_size=8 model.hidden_size=128 model.depth=6 num_train_steps=12000 &
run snr2 diffusion.$M=2 &
run w64_snr5 diffusion.$M=5 model.hidden_size=64 num_train_steps=2600 &
wait
