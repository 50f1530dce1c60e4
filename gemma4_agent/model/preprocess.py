"""Frame preprocessing, as the Gemma 4 Unified image processor does it (transformers is the oracle):
keep the aspect ratio, resize so that sides are multiples of the merged patch (48 px) and the
patch count fits the soft-token budget, bicubic with antialias, scale to [0, 1], cut into merged
patches in (row, col) order with (x, y) positions."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)


def target_size(height: int, width: int, max_soft_tokens: int, patch_size: int = 16, pooling: int = 3) -> tuple[int, int]:
    """Largest (h, w), multiples of patch_size * pooling, with at most max_soft_tokens merged patches."""
    side = patch_size * pooling
    target_px = max_soft_tokens * pooling**2 * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    max_side = (max_soft_tokens * pooling**2 // pooling**2) * side
    if th == 0 and tw == 0:
        raise ValueError(f"cannot resize a {height}x{width} image to a {side}-pixel patch grid")
    if th == 0:  # very wide: one patch row, as many columns as the aspect ratio allows
        th, tw = side, min(int(math.floor(width / height)) * side, max_side)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, max_side)
    return th, tw


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 HxWx3 -> uint8 3xhxw; bicubic + antialias on uint8, like torchvision's resize."""
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    if (image.shape[-2], image.shape[-1]) != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return image[0]


def frame_patches(rgb: np.ndarray, max_soft_tokens: int = 280, patch_size: int = 16, pooling: int = 3):
    """RGB uint8 [H, W, 3] of any size -> (patches [N, (patch*pooling)^2*3] uint8, positions [N, 2] int64 (x, y)):
    preprocess_frame before its scaling to [0, 1], which `scale_patches` does where the model runs (on a GPU: a
    quarter of the bytes to copy, and no float pass over every pixel on the host, the larger part of the work).

    Each merged patch's values are ordered (row, col, channel), matching the processor's layout."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens}")
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array of shape [H, W, 3], got "
                         f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"empty image {rgb.shape[0]}x{rgb.shape[1]}")
    height, width = target_size(rgb.shape[0], rgb.shape[1], max_soft_tokens, patch_size, pooling)
    image = resize_rgb(rgb, height, width)
    side = patch_size * pooling
    rows, cols = height // side, width // side
    patches = image.reshape(3, rows, side, cols, side).permute(1, 3, 2, 4, 0).reshape(rows * cols, side * side * 3)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    return patches.contiguous(), positions


def scale_patches(patches: torch.Tensor, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 patches (frame_patches) -> values in [0, 1] on `device` in `dtype`: divided in float32 wherever it
    runs, then cast. The divisor is a tensor on that device because CUDA turns a division by a Python number into
    a multiplication by its reciprocal, which differs from the CPU's division in the last bit."""
    patches = patches.to(device)
    # filled on the device, not copied from the host: inside a CUDA graph's capture (the session's frame chunk) a
    # copy from pageable memory is not allowed
    return (patches.float() / torch.full((), 255.0, device=patches.device)).to(dtype)


def preprocess_frame(rgb: np.ndarray, max_soft_tokens: int = 280, patch_size: int = 16, pooling: int = 3):
    """RGB uint8 [H, W, 3] of any size -> (patches [N, (patch*pooling)^2*3] float32 in [0, 1], positions [N, 2]
    int64 (x, y)), as the Gemma 4 Unified image processor makes them."""
    patches, positions = frame_patches(rgb, max_soft_tokens, patch_size, pooling)
    return scale_patches(patches), positions


def pad_patches(frames: list[tuple[torch.Tensor, torch.Tensor]], max_patches: int | None = None):
    """Stack per-image (patches, positions) into the processor's padded layout: padding rows at (-1, -1)."""
    max_patches = max_patches or max(p.shape[0] for p, _ in frames)
    dim = frames[0][0].shape[1]
    pixel_values = torch.zeros(len(frames), max_patches, dim)
    positions = torch.full((len(frames), max_patches, 2), -1, dtype=torch.long)
    for i, (p, pos) in enumerate(frames):
        pixel_values[i, : p.shape[0]] = p
        positions[i, : pos.shape[0]] = pos
    return pixel_values, positions
