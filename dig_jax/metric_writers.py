"""Metric writers with clu's ``MetricWriter`` interface, working without TensorFlow.

clu 0.0.12's ``clu.metric_writers`` package imports its TensorFlow summary writer at import time, so
neither it nor ``clu.periodic_actions`` (``ReportProgress``) can be imported where TF is missing (TF is not
on the GPU image, nor wanted). This module keeps clu's interface and its TF-free parts (``LoggingWriter``,
``MultiWriter``, ``AsyncMultiWriter``, ``ReportProgress``): before clu's package is first imported, it
installs a ``clu.metric_writers.summary_writer`` module whose ``SummaryWriter`` is our tensorboardX-backed
writer. clu's ``interface.py`` has no clu imports, so it is loaded from its file first to serve as the base
class. With TF and tensorboard installed, clu is imported unchanged.

What ``create_default_writer(logdir)`` returns writes every metric to
- the absl log (clu ``LoggingWriter``),
- TensorBoard event files in ``logdir`` (tensorboardX; skipped with one warning if tensorboardX is missing),
- ``logdir/metrics.jsonl``, one ``{"step": ..., name: value}`` line per ``write_scalars`` call, which scripts
  and tests read without a TensorBoard parser.

Deviation from clu: the default writer is synchronous unless ``asynchronous=True`` (clu defaults to async);
the train loop asks for async and flushes at the end.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging


def _load_clu_interface() -> types.ModuleType:
  """Returns ``clu.metric_writers.interface`` without running the TF-importing package ``__init__``."""
  name = "clu.metric_writers.interface"
  if name in sys.modules or "clu.metric_writers" in sys.modules or _tensorflow_available():
    return importlib.import_module(name)
  clu_spec = importlib.util.find_spec("clu")
  if clu_spec is None or not clu_spec.submodule_search_locations:
    raise ImportError("dig_jax.metric_writers needs clu (pip install clu==0.0.12).")
  path = os.path.join(list(clu_spec.submodule_search_locations)[0], "metric_writers", "interface.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def _tensorflow_available() -> bool:
  return (importlib.util.find_spec("tensorflow") is not None
          and importlib.util.find_spec("tensorboard") is not None)


interface = _load_clu_interface()
MetricWriter = interface.MetricWriter


class TensorBoardXWriter(MetricWriter):
  """Writes scalars, images, texts, histograms and hparams as TensorBoard event files via tensorboardX."""

  def __init__(self, logdir: str | os.PathLike[str]):
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard event files are written to %s.", logdir)
      self._writer = None
    else:
      self._writer = tensorboardX.SummaryWriter(os.fspath(logdir))

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    del step, values, metadata  # Raw TF summaries have no tensorboardX equivalent.

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if self._writer is not None:
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(np.asarray(value)), int(step))

  def write_images(self, step: int, images: Mapping[str, Any]):
    """Images are [N, H, W, C] (or [H, W, C]) uint8 or float in [0, 1]."""
    if self._writer is not None:
      for key, value in images.items():
        value = np.asarray(value)
        value = value[None] if value.ndim == 3 else value
        self._writer.add_images(key, value, int(step), dataformats="NHWC")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    del step, videos

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    del step, audios, sample_rate

  def write_texts(self, step: int, texts: Mapping[str, str]):
    if self._writer is not None:
      for key, value in texts.items():
        self._writer.add_text(key, value, int(step))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    if self._writer is not None:
      for key, value in arrays.items():
        self._writer.add_histogram(key, np.asarray(value), int(step))

  def write_hparams(self, hparams: Mapping[str, Any]):
    if self._writer is not None:
      self._writer.add_text("hparams", json.dumps(dict(hparams), default=str, indent=1), 0)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class JsonlWriter(MetricWriter):
  """Appends one JSON line per ``write_scalars`` call to a file; every other kind of value is ignored."""

  def __init__(self, path: str | os.PathLike[str]):
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._lock = threading.Lock()

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    with self._lock:
      self._file.write(json.dumps(record) + "\n")

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    with self._lock:
      if not self._file.closed:
        self._file.flush()

  def close(self):
    with self._lock:
      if not self._file.closed:
        self._file.close()


def _install_summary_writer_for_clu() -> None:
  """Lets ``import clu.metric_writers`` succeed without TF: its SummaryWriter becomes TensorBoardXWriter."""
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or "clu.metric_writers" in sys.modules or _tensorflow_available():
    return
  module = types.ModuleType(name, "TF-free stand-in installed by dig_jax.metric_writers.")
  module.SummaryWriter = TensorBoardXWriter
  sys.modules[name] = module


_install_summary_writer_for_clu()
from clu import metric_writers as clu_metric_writers  # noqa: E402  pylint: disable=g-import-not-at-top
from clu import periodic_actions  # noqa: E402  pylint: disable=g-import-not-at-top

LoggingWriter = clu_metric_writers.LoggingWriter
MultiWriter = clu_metric_writers.MultiWriter
AsyncMultiWriter = clu_metric_writers.AsyncMultiWriter
ReportProgress = periodic_actions.ReportProgress
METRICS_FILE = "metrics.jsonl"


def create_default_writer(logdir: str | os.PathLike[str] | None = None, *, just_logging: bool = False,
                          asynchronous: bool = False) -> MetricWriter:
  """A writer to the log, TensorBoard event files in `logdir` and ``logdir/metrics.jsonl``.

  Args:
    logdir: where event files and the JSONL file go; None writes only to the log.
    just_logging: only log (for processes other than 0 in a multi-host job).
    asynchronous: write from a background thread (call ``flush()`` before reading the files).
  """
  writers: list[MetricWriter] = [LoggingWriter()]
  if logdir is not None and not just_logging:
    os.makedirs(os.fspath(logdir), exist_ok=True)
    writers += [TensorBoardXWriter(logdir), JsonlWriter(os.path.join(os.fspath(logdir), METRICS_FILE))]
  return AsyncMultiWriter(writers) if asynchronous else MultiWriter(writers)


def read_jsonl_metrics(logdir: str | os.PathLike[str]) -> list[dict[str, float]]:
  """All records of ``logdir/metrics.jsonl`` in the order written (empty if there is none)."""
  path = os.path.join(os.fspath(logdir), METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
