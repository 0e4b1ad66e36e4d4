"""Image operations shared by every data source: ADM centre crop, channel matching, resizing, [-1, 1] scaling.

All functions take and return uint8 NumPy arrays in HWC layout (or NHWC for the batch helpers); only
`to_model_range` returns float32. PIL does the resampling, so results match what the ADM / DiT / DiG data
loaders produce with PIL.

The ADM centre crop (used by ADM, DiT and DiG for ImageNet) works in three steps:
1. while the short side is at least twice the target, halve both sides with a BOX filter (an exact 2x2 mean
   for even sides), which avoids the aliasing a single large BICUBIC downscale would cause;
2. resize with BICUBIC so that the short side equals the target size;
3. take the centre square (offsets rounded down).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# ITU-R 601-2 luma weights, the same ones PIL uses for RGB -> "L".
_LUMA_WEIGHTS = np.array([299, 587, 114], dtype=np.int64)


def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3):
    raise ValueError(f"expected an HxW or HxWxC image, got shape {array.shape}")
  return Image.fromarray(array)


def _as_hwc(array: np.ndarray) -> np.ndarray:
  return array[..., None] if array.ndim == 2 else array


def adm_center_crop(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """ADM centre crop of one image to `size` x `size`; returns uint8 HWC (channels kept)."""
  if size <= 0:
    raise ValueError(f"crop size must be positive, got {size}")
  pil_image = _as_pil(image)
  while min(pil_image.size) >= 2 * size:
    half_size = (pil_image.width // 2, pil_image.height // 2)
    pil_image = pil_image.resize(half_size, resample=Image.Resampling.BOX)
  scale = size / min(pil_image.size)
  scaled_size = (round(pil_image.width * scale), round(pil_image.height * scale))
  pil_image = pil_image.resize(scaled_size, resample=Image.Resampling.BICUBIC)
  array = _as_hwc(np.asarray(pil_image))
  top = (array.shape[0] - size) // 2
  left = (array.shape[1] - size) // 2
  return np.ascontiguousarray(array[top:top + size, left:left + size])


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Returns an HWC uint8 image with `channels` channels (grey replicated, RGB -> luma, alpha dropped)."""
  image = _as_hwc(np.asarray(image))
  have = image.shape[-1]
  if have in (2, 4):  # grey + alpha, RGB + alpha: drop alpha.
    image = image[..., :have - 1]
    have -= 1
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    luma = (image.astype(np.int64) @ _LUMA_WEIGHTS + 500) // 1000
    return luma.astype(np.uint8)[..., None]
  raise ValueError(f"cannot convert an image with {image.shape[-1]} channels to {channels} channels "
                   "(supported: 1 or 3 output channels)")


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes one uint8 HWC image to size x size: BOX (area) when shrinking, BICUBIC when enlarging."""
  image = _as_hwc(np.asarray(image))
  if image.shape[0] == size and image.shape[1] == size:
    return image
  shrinking = size < min(image.shape[0], image.shape[1])
  resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
  return _as_hwc(np.asarray(_as_pil(image).resize((size, size), resample=resample)))


def resize_square_batch(images: np.ndarray, size: int) -> np.ndarray:
  """`resize_square` over a uint8 NHWC batch."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  return np.stack([resize_square(image, size) for image in images])


def pad_images(images: np.ndarray, pad: int, value: int = 0) -> np.ndarray:
  """Pads a uint8 NHWC batch by `pad` pixels of `value` on every side."""
  return np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=value)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1), the range the diffusion model is trained in."""
  return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
