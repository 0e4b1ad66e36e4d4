"""Every config file parses, builds its model config, and overrides behave (locked configs, clear errors)."""

import importlib
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import common
from dig_jax import models, optim, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (file, arch, depth, hidden, heads) from the DiG/DiT size tables.
PAPER_CONFIGS = [
    ("s2", "dig", 12, 384, 6), ("b2", "dig", 12, 768, 12), ("l2", "dig", 24, 1024, 16),
    ("xl2", "dig", 28, 1152, 18), ("dit_s2", "dit", 12, 384, 6), ("dit_b2", "dit", 12, 768, 12),
    ("dit_l2", "dit", 24, 1024, 16), ("dit_xl2", "dit", 28, 1152, 16),
]


def load(name, arg=None):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("name,arch,depth,hidden,heads", PAPER_CONFIGS)
def test_paper_configs_follow_the_recipe(name, arch, depth, hidden, heads):
  config = load(name)
  model = models.resolve_model_config(config.model)
  assert (model.arch, model.depth, model.hidden_size, model.num_heads, model.patch_size) == (
      arch, depth, hidden, heads, 2)
  assert (model.input_size, model.in_channels, model.num_classes, model.learn_sigma) == (32, 4, 1000, True)
  assert model.class_dropout_prob == 0.1
  assert config.latent.vae == "sd-vae-ft-ema" and config.latent.scale_factor == 0.18215
  assert (config.input.image_size, config.input.batch_size, config.input.random_flip) == (256, 256, True)
  assert (config.optim.learning_rate, config.optim.weight_decay, config.optim.warmup_steps,
          config.optim.grad_clip_norm, config.optim.b2) == (1e-4, 0.0, 0, 0.0, 0.999)
  assert config.ema_decay == 0.9999 and config.num_train_steps == 400_000
  assert config.checkpoint_every_steps == 1000
  assert (config.sample.sampler, config.sample.num_steps, config.sample.cfg_scale) == ("ddpm", 250, 1.5)
  small = load(name, "runlocal")
  assert small.input.batch_size == 8 and small.num_train_steps == 10
  with pytest.raises(NotImplementedError, match="latent.vae"):
    sample.require_pixel_space(config)


def test_demo_config_builds_a_model_that_matches_its_data():
  config = load("demo")
  assert config.input.dataset == "embedded_mnist"
  model_config = models.resolve_model_config(config.model)
  assert (model_config.input_size, model_config.in_channels, model_config.num_classes) == (
      config.input.image_size, config.input.channels, config.input.num_classes)
  assert model_config.cfg_channels == 1
  sample.require_pixel_space(config)  # No VAE: pixel space.
  abstract = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert 100_000 < num_params < 5_000_000
  tx, schedule = optim.create_optimizer(config.optim, config.num_train_steps)
  assert tx is not None and float(schedule(0)) == 0.0
  # Peak lr right after the warm-up, whatever the decay after it.
  assert float(schedule(config.optim.warmup_steps)) == pytest.approx(config.optim.learning_rate)


def parse_flags(argv):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=os.path.join(REPO, "configs", "demo.py"),
                                  lock_config=True, flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_command_line_overrides_and_arguments():
  config = parse_flags(["prog", "--config.input.batch_size=16", "--config.sample.labels=1,2"])
  assert config.input.batch_size == 16 and config.sample.labels == "1,2"
  config = parse_flags(["prog", f"--config={os.path.join(REPO, 'configs', 'xl2.py')}:runlocal=True",
                        "--config.num_train_steps=3", "--config.mesh=(('data', -1), ('fsdp', 4))"])
  assert config.model.depth == 28 and config.input.batch_size == 8 and config.num_train_steps == 3
  assert tuple(map(tuple, config.mesh)) == (("data", -1), ("fsdp", 4))


def test_unknown_config_key_fails():
  with pytest.raises(AttributeError, match="bogus"):
    parse_flags(["prog", f"--config={os.path.join(REPO, 'configs', 'demo.py')}", "--config.input.bogus=1"])
  with pytest.raises(ValueError, match="Unknown config argument"):
    common.parse_arg("runlcal=True", runlocal=False)


def test_main_cli_reports_an_unknown_key_in_one_line(tmp_path):
  cmd = [sys.executable, "-m", "dig_jax.main", f"--workdir={tmp_path}", "--config.input.bogus=1"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert "FATAL Bad config override" in result.stderr and "config.input.bogus" in result.stderr
  assert not os.listdir(tmp_path)  # Nothing was started.


def test_learning_rate_schedules():
  config = load("demo").optim
  config.unlock()
  config.update(dict(learning_rate=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1))
  schedule = optim.create_learning_rate_schedule(config, 110)
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(0.1)
  config.schedule = "linear"
  with pytest.raises(ValueError, match="schedule"):
    optim.create_learning_rate_schedule(config, 110)
