"""End-to-end training on 8 fake CPU devices: checkpoints, exact resume, EMA, and clear errors for bad input.

Two short runs of a tiny DiG share one module fixture: run A trains 3 steps straight (checkpoints 1, 2, 3);
workdir B is A's workdir as it was after step 2 (step 3 removed), and a second call resumes B to step 3. B's
step-3 checkpoint must equal A's bit for bit (model, optimizer, EMA, step), which only holds if params,
optimizer state, RNG and the data iterator all resume exactly.
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flax import nnx
from configs import common

from dig_jax import checkpointing, input_pipeline, metric_writers, models, optim, train
from dig_jax import diffusion as diffusion_lib
from dig_jax import sample as sample_lib

# The module fixture `runs` (two training runs) is computed once: `make test`'s pytest-xdist workers
# (--dist loadgroup) run this module's tests in one process, not in each.
pytestmark = pytest.mark.xdist_group("test_train")

MESH = (("data", -1), ("fsdp", 2), ("tensor", 1), ("context", 1))


def tiny_config(num_train_steps: int, num_images: int = 0) -> ml_collections.ConfigDict:
  config = common.get_base_config()
  config.model_name = "tiny-DiG"
  config.model = common.model_config("DiG-S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                                     hidden_size=32, num_heads=2, cfg_channels=1, gla_chunk_size=8)
  config.input.update(dict(dataset="sklearn_digits", image_size=8, channels=1, batch_size=8, num_classes=10,
                           random_flip=True))
  config.optim.learning_rate = 1e-3
  config.ema_decay = 0.9
  config.num_train_steps = num_train_steps
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  config.sample_every_steps = 0
  config.sample.update(dict(sampler="ddim", num_steps=2, num_images=num_images, cfg_scale=1.5))
  config.mesh = MESH
  config.lock()
  return config


def read_state(workdir, step):
  """A checkpoint's train state, read by a plain orbax checkpointer (independent of dig_jax.checkpointing)."""
  path = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), checkpointing.STATE)
  return jax.device_get(ocp.PyTreeCheckpointer().restore(path))


def flat(tree):
  """{"params/blocks/0/...": leaf}: compares trees whose dict keys may come back as str instead of int."""
  def name(entry):
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))
  return {"/".join(name(e) for e in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b):
  a, b = flat(a), flat(b)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  straight, resumed = str(root / "straight"), str(root / "resumed")
  first = train.train_and_evaluate(tiny_config(3), straight)
  # Workdir B = A after step 2: drop checkpoint 3 and the metrics of step 3.
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(resumed), "3"))
  records = [r for r in metric_writers.read_jsonl_metrics(resumed) if r["step"] <= 2]
  with open(os.path.join(resumed, metric_writers.METRICS_FILE), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  captured = {}
  original = checkpointing.restore_latest

  def capture(manager, abstract_state, data_iterator):
    state, step = original(manager, abstract_state, data_iterator)
    captured.update(state=jax.device_get(state), step=step, data=data_iterator.get_state())
    return state, step

  checkpointing.restore_latest = capture
  try:
    second = train.train_and_evaluate(tiny_config(3, num_images=4), resumed)
  finally:
    checkpointing.restore_latest = original
  return dict(straight=straight, resumed=resumed, first=first, second=second, captured=captured)


def test_runs_write_checkpoints_config_and_metrics(runs):
  workdir = runs["resumed"]
  assert runs["first"]["step"] == 3 and np.isfinite(runs["first"]["loss"])
  assert sorted(int(s) for s in os.listdir(checkpointing.checkpoint_dir(workdir)) if s.isdigit()) == [1, 2, 3]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["model"]["depth"] == 1 and saved["input"]["dataset"] == "sklearn_digits"
  steps = [r["step"] for r in metric_writers.read_jsonl_metrics(workdir) if "train/loss" in r]
  assert steps == [1, 2, 3]  # The resumed run continued at 3; nothing was redone.
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_resume_restores_the_saved_state_and_data_position(runs):
  captured, workdir = runs["captured"], runs["resumed"]
  assert captured["step"] == 2
  saved = read_state(workdir, 2)
  assert int(captured["state"]["step"]) == 2
  assert_trees_equal(captured["state"]["params"], saved["params"])
  assert_trees_equal(captured["state"]["ema_params"], saved["ema_params"])
  with open(os.path.join(checkpointing.checkpoint_dir(workdir), "2", checkpointing.DATA,
                         "process_0-of-1.json"), encoding="utf-8") as f:
    assert captured["data"] == json.load(f)
  assert runs["second"]["step"] == 3


def test_resumed_run_equals_uninterrupted_run(runs):
  straight, resumed = read_state(runs["straight"], 3), read_state(runs["resumed"], 3)
  assert int(straight["step"]) == int(resumed["step"]) == 3
  assert_trees_equal(straight, resumed)
  # ...and the step did train: step 3 differs from step 2.
  before, after = flat(read_state(runs["resumed"], 2)["params"]), flat(resumed["params"])
  assert any(not np.array_equal(before[k], after[k]) for k in after)


def copy_of_straight_run(runs, tmp_path) -> tuple[str, str, str]:
  """(workdir, its config.json path, that file's text) of a copy of run A's workdir."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs["straight"], workdir)
  config_path = os.path.join(workdir, "config.json")
  with open(config_path, encoding="utf-8") as f:
    return workdir, config_path, f.read()


def test_resuming_with_the_other_block_layout_is_one_clear_error_and_keeps_the_workdir(runs, tmp_path):
  workdir, config_path, saved_text = copy_of_straight_run(runs, tmp_path)
  assert json.loads(saved_text)["model"]["stack_blocks"] is True  # the default layout
  config = tiny_config(4).unlock()
  config.model.stack_blocks = False
  with pytest.raises(ValueError, match=r"--config\.model\.stack_blocks=True"):
    train.train_and_evaluate(config, workdir)
  with open(config_path, encoding="utf-8") as f:
    assert f.read() == saved_text  # nothing overwritten
  # A workdir written before the field existed stored its blocks one by one.
  old = json.loads(saved_text)
  del old["model"]["stack_blocks"]
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(old, f)
  assert sample_lib.load_config(workdir).model.stack_blocks is False
  with pytest.raises(ValueError, match=r"--config\.model\.stack_blocks=False"):
    train.train_and_evaluate(tiny_config(4), workdir)


def test_resuming_with_a_changed_model_names_the_fields_and_keeps_config_and_checkpoints(runs, tmp_path):
  workdir, config_path, saved_text = copy_of_straight_run(runs, tmp_path)
  steps_before = sorted(os.listdir(checkpointing.checkpoint_dir(workdir)))
  config = tiny_config(4).unlock()
  config.model.depth = 2  # block parameters [2, ...] against the saved [1, ...]
  with pytest.raises(RuntimeError, match=r"model\.depth: 1 \(saved\) vs 2 \(this run\)"):
    train.train_and_evaluate(config, workdir)
  with open(config_path, encoding="utf-8") as f:
    assert f.read() == saved_text  # the saved config still describes the checkpoints
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == steps_before  # nothing deleted


def test_ema_follows_the_decay_rule(runs):
  before, after = read_state(runs["resumed"], 2), read_state(runs["resumed"], 3)
  ema_before, params_after = flat(before["ema_params"]), flat(after["params"])
  ema_after = flat(after["ema_params"])
  for key, value in ema_after.items():
    np.testing.assert_allclose(value, 0.9 * ema_before[key] + 0.1 * params_after[key], rtol=1e-6, atol=1e-7,
                               err_msg=key)
  assert any(not np.allclose(ema_after[k], params_after[k]) for k in ema_after)


def test_final_sample_grid_is_written(runs):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = os.path.join(runs["resumed"], "samples", "step_0000003.png")
  image = np.asarray(Image.open(path))
  # 4 images of 8x8 in a 4-column grid (one column per class up to num_images) with 2-pixel padding.
  assert image.shape == (2 + 10, 2 + 4 * 10)


def test_batch_not_divisible_by_devices_is_one_clear_error(tmp_path):
  config = tiny_config(1)
  config.input.batch_size = 12
  with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
    train.train_and_evaluate(config, str(tmp_path))


def test_missing_data_directory_is_one_clear_error(tmp_path):
  config = tiny_config(1)
  missing = str(tmp_path / "no_such_tfds_dir")
  config.input.update(dict(dataset="tfds", tfds_name="mnist", data_dir=missing))
  with pytest.raises(FileNotFoundError, match="does not exist") as info:
    train.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert missing in str(info.value)


def test_latent_config_stops_at_the_vae_seam(tmp_path):
  from configs import s2  # pylint: disable=g-import-not-at-top
  with pytest.raises(NotImplementedError, match="latent.vae"):
    train.train_and_evaluate(s2.get_config("runlocal"), str(tmp_path))


def test_non_finite_metrics_raise():
  with pytest.raises(FloatingPointError, match="step 7"):
    metrics = {"loss": jax.numpy.float32(np.nan), "grad_norm": jax.numpy.float32(1.0)}
    train._host_metrics(metrics, 7)  # pylint: disable=protected-access


def test_restore_skips_and_removes_a_corrupt_newest_step(tmp_path):
  config = tiny_config(1)
  iterator = input_pipeline.create_train_iterator(config.input, seed=0)
  manager = checkpointing.create_manager(str(tmp_path), every_steps=1, asynchronous=False)
  for step in (1, 2):
    next(iterator)
    state = {"step": jax.numpy.int32(step), "w": jax.numpy.full((4,), float(step))}
    assert checkpointing.save(manager, step, state, iterator)
  manager.wait_until_finished()
  step_dir = os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "2", checkpointing.STATE)
  for name in os.listdir(step_dir):  # Corrupt step 2: drop its array data, keep its metadata.
    if name not in ("_METADATA", "_CHECKPOINT_METADATA"):
      path = os.path.join(step_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  fresh = input_pipeline.create_train_iterator(config.input, seed=0)
  abstract = {"step": jax.ShapeDtypeStruct((), np.int32), "w": jax.ShapeDtypeStruct((4,), np.float32)}
  restored, step = checkpointing.restore_latest(manager, abstract, fresh)
  assert step == 1 and int(restored["step"]) == 1
  np.testing.assert_array_equal(restored["w"], np.ones(4))
  assert fresh.get_state() == _state_after_batches(config, 1)
  assert manager.all_steps() == [1]
  checkpointing.wait_and_close(manager)


def _state_after_batches(config, count):
  iterator = input_pipeline.create_train_iterator(config.input, seed=0)
  for _ in range(count):
    next(iterator)
  return iterator.get_state()


def test_norms_are_computed_on_logged_steps_only():
  """The norm metrics cost a few hundred reductions per step, so train_step computes them only on log steps."""
  config = tiny_config(num_train_steps=5)
  tx, schedule = optim.create_optimizer(config.optim, config.num_train_steps)
  state = train._init_state(jax.random.key(0), model_config=config.model, tx=tx)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0))))
  step_fn = jax.jit(lambda s, b, r: train.train_step(
      s, b, r, graphdef=graphdef, tx=tx, diffusion=diffusion_lib.create_diffusion(""), lr_schedule=schedule,
      ema_decay=0.9, label_dropout=True, log_every_steps=2, num_train_steps=5))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  logged = []
  for _ in range(5):
    state, metrics = step_fn(state, batch, jax.random.key(1))
    logged.append(float(metrics["grad_norm"]) > 0 and float(metrics["param_norm"]) > 0)
  assert logged == [False, True, False, True, True]  # Steps 2 and 4 (every 2) and 5 (the last).


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
  """An official-format checkpoint of the tiny model, imported with the converter's CLI (what users run)."""
  from dig_jax import convert  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("converted")
  model = models.create_model(tiny_config(1).model, rngs=nnx.Rngs(7))
  source = root / "official.safetensors"
  convert.save_torch_state_dict(convert.export_official(model), source)
  out = root / "imported"
  convert.main(["import", f"--checkpoint={source}", "--model=DiG-S/2", f"--out={out}",
                '--overrides={"depth": 1, "hidden_size": 32, "num_heads": 2}'])
  return str(out), nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_init_from_a_converted_checkpoint_starts_from_its_weights(converted_folder, tmp_path):
  folder, expected = converted_folder
  config = tiny_config(1).unlock()
  config.init_from = folder
  config.ema_decay = 1.0  # the EMA then keeps the initial weights exactly
  train.train_and_evaluate(config, str(tmp_path / "run"))
  state = read_state(str(tmp_path / "run"), 1)
  assert int(state["step"]) == 1
  assert_trees_equal(state["ema_params"], expected)
  changed = [k for k, v in flat(state["params"]).items() if not np.array_equal(v, flat(expected)[k])]
  assert changed  # and training moved on from them


def test_init_from_a_different_architecture_or_missing_folder_is_one_clear_error(converted_folder, tmp_path,
                                                                                 monkeypatch):
  folder, _ = converted_folder
  writers = []  # the loop's metric writers: each must be closed although the run fails
  create = metric_writers.create_default_writer

  def recording_writer(*args, **kwargs):
    writer = create(*args, **kwargs)
    close = writer.close
    writer.close = lambda: (writers.append("closed"), close())[1]
    writers.append("open")
    return writer
  monkeypatch.setattr(metric_writers, "create_default_writer", recording_writer)
  config = tiny_config(1).unlock()
  config.init_from = folder
  config.model.depth = 2
  with pytest.raises(ValueError, match=r"--config\.model\.depth=1"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config.model.depth = 1
  config.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="convert import"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  assert writers == ["open", "closed", "open", "closed"]
