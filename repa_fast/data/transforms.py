"""ADM center crop (docs/objective.md §Latents; guided-diffusion ``center_crop_arr``, REPA ``center-crop-dhariwal``)."""

from __future__ import annotations

import numpy as np


def adm_center_crop(image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8: BOX-halve while min side >= 2*size, BICUBIC to short side = size, crop.

    Each dimension is rounded with Python's ``round`` (ties to even), as the reference does; the crop offsets are
    floor((H - size) / 2) and floor((W - size) / 2).
    """
    import PIL.Image

    image = image.convert("RGB")
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.Resampling.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.asarray(image)  # (H, W, 3)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.array(arr[top : top + size, left : left + size], copy=True)  # writable, contiguous


def adm_crop_geometry(width: int, height: int, size: int) -> tuple[list[tuple[int, int]], tuple[int, int], tuple]:
    """The sizes ``adm_center_crop`` goes through, for resizers other than PIL (``preprocess --decoder dali``).

    Returns (the (H, W) after each BOX halving, the (H, W) of the BICUBIC resize, the (top, left) crop offset).
    """
    w, h, halvings = int(width), int(height), []
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        halvings.append((h, w))
    scale = size / min(w, h)
    fw, fh = round(w * scale), round(h * scale)
    return halvings, (fh, fw), ((fh - size) // 2, (fw - size) // 2)
