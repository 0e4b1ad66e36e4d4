"""End-to-end quality benchmark of the MNIST demo: train as a user would, sample 1,000 digits, score them.

  python -m benchmarks.demo_quality [--workdir=workdir/demo] [--skip_train] [--overwrite]

1. Training: runs the README command (``make demo`` = ``python -m dig_jax.main --config=configs/demo.py
   --workdir=<workdir>``) as a subprocess and times it end to end (start-up, compilation, training and the
   final sample grid the loop writes). The load average is sampled every 5 s meanwhile, because the machine
   this was tuned on is shared: the JSON keeps the measured wall time *and* the load it ran under.
2. Sampling: restores the EMA parameters and draws `--samples_per_class` digits per class (default 100, so
   1,000) with DPM-Solver++(2M), 20 steps, classifier-free guidance at the config's ``sample.cfg_scale``
   (DDPM-250 on 1,000 guided images would take >12x longer on a CPU; ``--sampler=ddim --num_steps=50``
   matches the training grid's sampler at 2.5x the cost).
3. Scoring (benchmarks/digit_metrics.py): a small CNN trained on the 4,500 embedded training digits (its
   accuracy on the 500 held-out real digits is reported), class accuracy of the generated digits (label = the
   requested class) and the Fréchet distance in the CNN's 128-d penultimate features between the samples and
   the 500 held-out digits, with the 4,500 real training digits vs the same 500 as the floor.

Writes ``benchmarks/results/demo_quality.json`` and a 10x10 sample grid (one column per class, digits 0-9
left to right) to ``docs/demo_samples.png``. ``--no_write`` (for tuning probes) only prints the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import app, flags

from benchmarks import digit_metrics

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/demo", "Training workdir (the README's default).")
flags.DEFINE_bool("skip_train", False, "Score an existing workdir instead of training.")
flags.DEFINE_bool("overwrite", False, "Delete an existing --workdir before training (else it is an error: "
                  "the loop would resume it and the timing would be meaningless).")
flags.DEFINE_multi_string("override", [], "Extra --config.* overrides for the training run (tuning probes), "
                          "e.g. --override=config.num_train_steps=300.")
flags.DEFINE_integer("samples_per_class", 100, "Generated digits per class.")
flags.DEFINE_enum("sampler", "dpm", ["ddim", "ddpm", "dpm"], "Sampler for the scored digits.")
flags.DEFINE_integer("num_steps", 20, "Sampling steps.")
flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the trained config's sample.cfg_scale).")
flags.DEFINE_integer("sample_batch", 250, "Images per compiled sampling batch.")
flags.DEFINE_integer("seed", 1, "Sampling seed (the training grid uses 0).")
flags.DEFINE_string("classifier_cache", "", "Optional .npz to load the classifier from / save it to.")
flags.DEFINE_string("out_json", "benchmarks/results/demo_quality.json", "Results file.")
flags.DEFINE_string("grid_png", "docs/demo_samples.png", "10x10 sample grid.")
flags.DEFINE_bool("no_write", False, "Print the results only (tuning probes).")


def _cpu_info() -> dict[str, object]:
  model = platform.processor() or ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu_model": model, "cpu_count": os.cpu_count(),
          "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


class _LoadSampler:
  """Samples the 1-minute load average every `period` seconds in a thread."""

  def __init__(self, period: float = 5.0):
    self.values: list[float] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

  def _run(self, period: float) -> None:
    while not self._stop.wait(period):
      self.values.append(os.getloadavg()[0])

  def __enter__(self) -> "_LoadSampler":
    self.start = os.getloadavg()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.end = os.getloadavg()

  def summary(self) -> dict[str, object]:
    values = self.values or [self.end[0]]
    return {"loadavg_at_start": list(self.start), "loadavg_at_end": list(self.end),
            "loadavg_1min_mean_during": sum(values) / len(values), "loadavg_1min_max_during": max(values)}


def train(workdir: str, overrides: Sequence[str]) -> dict[str, object]:
  """Runs the README command in a subprocess; returns wall time, load and the loop's own metrics."""
  if os.path.exists(os.path.join(workdir, "checkpoints")) or os.path.exists(os.path.join(workdir,
                                                                                        "config.json")):
    if not _FLAGS.overwrite:
      raise FileExistsError(f"{workdir} already holds a run; the loop would resume it. Pass --overwrite to "
                            "delete it, another --workdir, or --skip_train to score it as it is.")
    shutil.rmtree(workdir)
  command = [sys.executable, "-m", "dig_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
             *[f"--{o.lstrip('-')}" for o in overrides]]
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "train_stdout.log")
  print("running:", " ".join(command), flush=True)
  with _LoadSampler() as load, open(log_path, "w", encoding="utf-8") as log:
    t0 = time.time()
    result = subprocess.run(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.time() - t0
  if result.returncode:
    raise RuntimeError(f"Training failed (exit {result.returncode}); see {log_path}.")
  steps_per_sec, losses = [], []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "train/steps_per_sec" in record:
        steps_per_sec.append(record["train/steps_per_sec"])
        losses.append((record["step"], record.get("train/loss")))
  # Recorded as a user would type it: the workdir relative to the repository when it lies inside it, so the
  # committed JSON names no path of the machine it ran on.
  relative = os.path.relpath(workdir, _REPO)
  shown_workdir = workdir if relative.startswith("..") else relative
  shown = [f"--workdir={shown_workdir}" if arg.startswith("--workdir=") else arg for arg in command[1:]]
  return {"command": " ".join(["python", *shown]), "train_wall_s": wall, **load.summary(),
          # The first interval includes compilation; the rest is the steady state.
          "steps_per_sec_steady_median": sorted(steps_per_sec[1:] or steps_per_sec)[
              len(steps_per_sec[1:] or steps_per_sec) // 2] if steps_per_sec else None,
          "loss_curve": losses}


def sample(workdir: str) -> tuple[object, object, dict[str, object]]:
  """1,000 (by default) class-conditional digits from the workdir's EMA parameters."""
  import jax  # pylint: disable=g-import-not-at-top  (after absl flags; keeps --help fast)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dig_jax import sample as sample_lib, sharding  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  restored = sample_lib.load_ema_params(workdir)
  cfg_scale = float(restored.config.sample.cfg_scale if _FLAGS.cfg_scale is None else _FLAGS.cfg_scale)
  labels = np.repeat(np.arange(10, dtype=np.int32), _FLAGS.samples_per_class)
  t0 = time.time()
  with jax.set_mesh(restored.mesh), nnx.logical_axis_rules(restored.rules):
    images = sample_lib.sample_images(
        restored.graphdef, restored.ema_params, restored.model_state, restored.config, labels=labels,
        rng=jax.random.key(_FLAGS.seed), sampler=_FLAGS.sampler, num_steps=_FLAGS.num_steps,
        cfg_scale=cfg_scale, eta=0.0, clip_denoised=_FLAGS.sampler != "dpm",
        batch_size=min(_FLAGS.sample_batch, len(labels)),
        batch_sharding=sharding.batch_sharding(restored.mesh, restored.rules, 1))
  info = {"sampler": _FLAGS.sampler, "num_steps": _FLAGS.num_steps, "cfg_scale": cfg_scale, "eta": 0.0,
          "clip_denoised": _FLAGS.sampler != "dpm", "num_samples": int(len(labels)),
          "checkpoint_step": int(restored.step), "sample_wall_s": time.time() - t0}
  return images, labels, info


def grid_by_class(images, labels, per_class: int = 10):
  """[rows=per_class, cols=10 classes] grid, upscaled 2x (nearest) so the digits are visible in docs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dig_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  picked = [images[labels == c][:per_class] for c in range(10)]
  ordered = np.stack([picked[c][r] for r in range(per_class) for c in range(10)])
  grid = sample_lib.image_grid(ordered, 10)
  return grid.repeat(2, axis=0).repeat(2, axis=1)


def main(argv: Sequence[str]) -> None:
  del argv
  workdir = os.path.abspath(_FLAGS.workdir)
  results: dict[str, object] = {"benchmark": "demo_quality", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime()),
                                **_cpu_info()}
  if not _FLAGS.skip_train:
    results["training"] = train(workdir, _FLAGS.override)
  from dig_jax.input_pipeline import load_embedded_mnist  # pylint: disable=g-import-not-at-top
  from dig_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  config = sample_lib.load_config(workdir)
  results["config"] = {"model": config.model.to_dict(), "batch_size": config.input.batch_size,
                       "num_train_steps": config.num_train_steps, "optim": config.optim.to_dict(),
                       "ema_decay": config.ema_decay, "grid_sample": config.sample.to_dict()}
  with _LoadSampler() as load:
    images, labels, sample_info = sample(workdir)
  results["sampling"] = dict(sample_info, **load.summary())

  t0 = time.time()
  train_x, train_y = load_embedded_mnist("train")
  test_x, test_y = load_embedded_mnist("test")
  classifier = digit_metrics.load_or_train_classifier(_FLAGS.classifier_cache or None, train_x, train_y)
  scores = digit_metrics.score_samples(classifier, images, labels, test_x)
  floor = digit_metrics.frechet_distance(classifier.features(train_x), classifier.features(test_x))
  results["scoring"] = {
      "classifier": "LeNet-style CNN (conv32-conv64-dense128), Adam, shift augmentation, 12 epochs",
      "classifier_test_accuracy": classifier.accuracy(test_x, test_y),
      "classifier_train_seconds": classifier.train_seconds,
      "generated_class_accuracy": scores["class_accuracy"],
      "generated_per_class_accuracy": scores["per_class_accuracy"],
      "fid_generated_vs_test": scores["fid_vs_test"],
      "fid_floor_real_train_vs_test": floor,
      "feature_space": "classifier penultimate layer (128-d, ReLU)",
      "scoring_wall_s": time.time() - t0}
  text = json.dumps(results, indent=2)
  print(text)
  if not _FLAGS.no_write:
    out_json = os.path.join(_REPO, _FLAGS.out_json)
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    with open(out_json, "w", encoding="utf-8") as f:
      f.write(text + "\n")
    if _FLAGS.samples_per_class >= 10:
      sample_lib.save_png(grid_by_class(images, labels), os.path.join(_REPO, _FLAGS.grid_png))


if __name__ == "__main__":
  app.run(main)
