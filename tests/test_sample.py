"""Sampling: uint8 conversion, grids, labels, the VAE seam, EMA restore, and the CLI's PNG + npz output."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import common
from dig_jax import checkpointing, input_pipeline, optim, sample, sharding, train

# The module fixture `workdir` (a trained checkpoint) is computed once: `make test`'s pytest-xdist workers
# (--dist loadgroup) run this module's tests in one process, not in each.
pytestmark = pytest.mark.xdist_group("test_sample")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  config = common.get_base_config()
  config.model = common.model_config("DiG-S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                                     hidden_size=32, num_heads=2, cfg_channels=1, gla_chunk_size=8)
  config.input.update(dict(dataset="sklearn_digits", image_size=8, channels=1, batch_size=8, num_classes=10))
  config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1), ("context", 1))
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as training leaves it: config.json and a step-5 checkpoint with EMA != params."""
  path = str(tmp_path_factory.mktemp("sample_workdir"))
  config = tiny_config()
  mesh, rules = sharding.create_mesh(config.mesh), sharding.logical_axis_rules(config.logical_axis_rules)
  tx, _ = optim.create_optimizer(config.optim, 10)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    init = functools.partial(train._init_state, model_config=config.model, tx=tx)  # pylint: disable=W0212
    state = jax.jit(init)(jax.random.key(0))
  # A non-zero EMA (the fresh model's output layer is zero-initialised), distinct from the params, on their
  # shardings. Drawn with NumPy: eager jax.random draws compile a program per parameter shape, and one jit of
  # all the draws compiles about as long.
  rng = np.random.default_rng(1)

  def perturbed(p):
    return jax.device_put((np.asarray(p) + 0.05 * rng.standard_normal(p.shape)).astype(p.dtype), p.sharding)

  state["ema_params"] = jax.tree.map(perturbed, state["params"])
  state["step"] = jnp.int32(5)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort())
  manager = checkpointing.create_manager(path, every_steps=5, asynchronous=False)
  iterator = input_pipeline.create_train_iterator(config.input, seed=0)
  assert checkpointing.save(manager, 5, state, iterator)
  checkpointing.wait_and_close(manager)
  return {"path": path, "ema": jax.device_get(state["ema_params"])}


def test_to_uint8_matches_dit_formula():
  x = np.array([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(sample.to_uint8(x), [0, 0, 64, 128, 255, 255, 255])


def test_image_grid_layout():
  images = np.stack([np.full((3, 4, 1), i, np.uint8) for i in range(1, 6)])
  grid = sample.image_grid(images, num_columns=2, padding=1)
  assert grid.shape == (3 * 4 + 1, 2 * 5 + 1, 1)
  assert grid[1, 1, 0] == 1 and grid[1, 6, 0] == 2 and grid[5, 1, 0] == 3 and grid[9, 1, 0] == 5
  assert grid[9, 6, 0] == 0  # The missing sixth cell stays black.


def test_parse_labels():
  np.testing.assert_array_equal(sample.parse_labels("3,1", 5, 10), [3, 1, 3, 1, 3])
  np.testing.assert_array_equal(sample.parse_labels("", 4, 3), [0, 1, 2, 0])
  random = sample.parse_labels(None, 100, 10, rng=np.random.default_rng(0))
  assert random.min() >= 0 and random.max() < 10 and len(set(random.tolist())) > 5
  with pytest.raises(ValueError, match="outside"):
    sample.parse_labels("10", 2, 10)


def test_latent_configs_raise_at_decode():
  config = tiny_config()
  config.latent.vae = common.SD_VAE
  with pytest.raises(NotImplementedError, match="latent.vae"):
    sample.decode(jnp.zeros((1, 8, 8, 1)), config)


def test_restores_ema_params_and_samples_in_batches(workdir):
  restored = sample.load_ema_params(workdir["path"])
  assert restored.step == 5
  np.testing.assert_array_equal(jax.device_get(restored.ema_params["final_layer"]["linear"]["kernel"]),
                                workdir["ema"]["final_layer"]["linear"]["kernel"])
  with jax.set_mesh(restored.mesh), nnx.logical_axis_rules(restored.rules):
    images = sample.sample_images(restored.graphdef, restored.ema_params, restored.model_state,
                                  restored.config, labels=np.array([1, 2, 3]), rng=jax.random.key(0),
                                  sampler="dpm", num_steps=2, cfg_scale=1.0, batch_size=2)
  assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
  assert images.std() > 0


def test_cli_writes_png_and_npz(workdir, tmp_path):
  out = str(tmp_path / "out")
  # 10 samples in batches of 8 (split over the 8 devices; the second batch padded), guided DDIM.
  cmd = [sys.executable, "-m", "dig_jax.sample", f"--workdir={workdir['path']}", "--num_samples=10",
         "--cfg_scale=1.5", "--num_steps=2", "--sampler=ddim", "--seed=0", "--labels=1,2,3", "--batch_size=8",
         f"--out={out}"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(os.path.join(out, "samples.npz")) as data:
    samples, labels = data["arr_0"], data["labels"]
  assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.uint8
  assert samples.std() > 0
  np.testing.assert_array_equal(labels, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1])
  grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
  assert grid.shape == (2 + 3 * 10, 2 + 4 * 10)  # 10 images of 8x8, 4 columns, 2-pixel padding.


def test_cli_without_checkpoint_is_one_clear_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
  with pytest.raises(FileNotFoundError, match="No checkpoints"):
    sample.load_ema_params(str(tmp_path))
