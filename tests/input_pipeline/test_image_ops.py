"""ADM centre crop and channel handling against small independent computations."""

import numpy as np
import pytest
from PIL import Image

from dig_jax.data import image_ops


def _box_halve(image):
  """BOX halving as PIL computes it for uint8: a separable 2-tap mean, horizontal pass then vertical pass,
  each rounded half up (so the 2x2 mean is rounded twice)."""
  h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
  image = image[:h, :w].astype(np.int64)
  horizontal = (image[:, 0::2] + image[:, 1::2] + 1) // 2
  return ((horizontal[0::2] + horizontal[1::2] + 1) // 2).astype(np.uint8)


def test_two_times_too_large_image_is_box_halved_then_centre_cropped():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)  # short side exactly 2 * 32
  cropped = image_ops.adm_center_crop(image, 32)
  halved = _box_halve(image)  # 32 x 40: short side already 32, so the BICUBIC step is the identity
  expected = halved[:, 4:36]  # (40 - 32) // 2 = 4
  assert cropped.shape == (32, 32, 3) and cropped.dtype == np.uint8
  np.testing.assert_array_equal(cropped, expected)
  exact_mean = image.astype(np.float64).reshape(32, 2, 40, 2, 3).mean(axis=(1, 3))[:, 4:36]
  np.testing.assert_allclose(cropped, exact_mean, atol=1)  # and it is the 2x2 average up to rounding


def test_box_halving_repeats_while_short_side_is_at_least_twice_the_target():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, size=(128, 136, 1), dtype=np.uint8)  # 128 -> 64 -> 32 with two halvings
  cropped = image_ops.adm_center_crop(image, 32)
  expected = _box_halve(_box_halve(image))[:, 1:33]  # 34 wide -> offset (34 - 32) // 2 = 1
  assert cropped.shape == (32, 32, 1)
  np.testing.assert_array_equal(cropped, expected)


def test_small_image_is_bicubic_resized_on_the_short_side_then_centre_cropped():
  # 50 x 70 (H x W) to 20: 50 >= 40 -> one BOX halving to 25 x 35, then BICUBIC to 20 x 28, crop left 4.
  x = np.arange(70, dtype=np.float64)
  image = np.broadcast_to(np.round(x * 255 / 69)[None, :, None], (50, 70, 3)).astype(np.uint8).copy()
  cropped = image_ops.adm_center_crop(image, 20)
  assert cropped.shape == (20, 20, 3)
  # A horizontal ramp stays a ramp: rows identical, columns of the centre crop increase.
  np.testing.assert_array_equal(cropped, np.broadcast_to(cropped[:1], cropped.shape))
  assert np.all(np.diff(cropped[0, :, 0].astype(int)) > 0)
  # The centre column maps back to the centre of the original ramp (~127).
  assert abs((int(cropped[0, 9, 0]) + int(cropped[0, 10, 0])) / 2 - 127.5) <= 4


def test_portrait_crop_takes_the_vertical_centre():
  image = np.zeros((48, 16, 1), np.uint8)
  image[16:32] = 200  # only the middle third is bright
  np.testing.assert_array_equal(image_ops.adm_center_crop(image, 16), image[16:32])


def test_crop_accepts_pil_and_keeps_constant_colour():
  image = Image.new("RGB", (300, 200), (10, 120, 250))
  cropped = image_ops.adm_center_crop(image, 16)
  assert cropped.shape == (16, 16, 3)
  np.testing.assert_array_equal(cropped, np.broadcast_to([10, 120, 250], (16, 16, 3)))


def test_match_channels():
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  np.testing.assert_array_equal(image_ops.match_channels(grey, 3), np.repeat(grey, 3, axis=-1))
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
  np.testing.assert_array_equal(image_ops.match_channels(rgb, 1)[..., 0], [[76, 150, 29]])
  rgba = np.concatenate([rgb, np.zeros((1, 3, 1), np.uint8)], axis=-1)
  np.testing.assert_array_equal(image_ops.match_channels(rgba, 3), rgb)
  with pytest.raises(ValueError, match="channels"):
    image_ops.match_channels(rgb, 2)


def test_to_model_range():
  np.testing.assert_allclose(image_ops.to_model_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])
