"""The TF-free metric writer: clu's interface, TensorBoard events (tensorboardX), JSONL, progress."""

import glob
import importlib.util
import os

import numpy as np
import pytest

from dig_jax import metric_writers


def test_writer_keeps_clu_interface_and_logs_scalars(tmp_path):
  writer = metric_writers.create_default_writer(tmp_path)
  assert isinstance(writer, metric_writers.MetricWriter)
  writer.write_scalars(3, {"loss": np.float32(0.25), "lr": 1e-4})
  writer.write_scalars(7, {"loss": 0.125})
  writer.write_images(7, {"samples": np.zeros((2, 4, 4, 1), np.uint8)})
  writer.write_hparams({"batch_size": 8})
  writer.flush()
  records = metric_writers.read_jsonl_metrics(tmp_path)
  assert records == [{"step": 3, "loss": 0.25, "lr": 1e-4}, {"step": 7, "loss": 0.125}]
  writer.close()


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None, reason="tensorboardX not installed")
def test_event_file_holds_the_scalar(tmp_path):
  from tensorboardX.event_file_writer import event_pb2  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(tmp_path, asynchronous=True)
  writer.write_scalars(5, {"train/loss": 1.5})
  writer.flush()
  writer.close()
  files = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
  assert len(files) == 1
  values = []
  for record in _read_tfrecords(files[0]):
    event = event_pb2.Event.FromString(record)
    values += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  assert values == [(5, "train/loss", 1.5)]


def _read_tfrecords(path):
  """Minimal TFRecord reader (length, crc, payload, crc) so the test needs no TensorFlow."""
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    length = int.from_bytes(data[offset:offset + 8], "little")
    yield data[offset + 12:offset + 12 + length]
    offset += 12 + length + 4


def test_just_logging_writes_no_files(tmp_path):
  writer = metric_writers.create_default_writer(tmp_path / "sub", just_logging=True)
  writer.write_scalars(1, {"x": 1.0})
  writer.flush()
  assert not os.path.exists(tmp_path / "sub")


def test_report_progress_writes_steps_per_sec(tmp_path):
  writer = metric_writers.create_default_writer(tmp_path)
  progress = metric_writers.ReportProgress(num_train_steps=4, writer=writer, every_steps=2, every_secs=None)
  for step in range(1, 5):
    progress(step)
  writer.flush()
  steps = [r["step"] for r in metric_writers.read_jsonl_metrics(tmp_path) if "steps_per_sec" in r]
  assert steps == [2, 4]
