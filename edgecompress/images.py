"""Image sources for calibrating and checking image classifiers, and the crops fed to them.

Sources (one string each, as a recipe writes it):

* ``skimage:calib`` / ``skimage:eval`` -- scikit-image's bundled sample photographs and micrographs
  (the ``images`` extra: ``pip install -e '.[images]'``; offline), split by FILE: the even-indexed
  files (sorted by name) calibrate, the odd-indexed ones evaluate, so no evaluation image is ever seen
  in calibration.
* a folder -- every ``.png``/``.jpg``/``.jpeg``/``.bmp``/``.webp`` file in it (sorted), read with
  Pillow. Give calibration and evaluation disjoint folders.

:func:`image_crops` turns a source into ``n`` model inputs: crops are spread evenly over the files
(file ``i`` gets crops ``i, i + F, i + 2F, ...``), each a random square of 60-100% of the short side,
resized to ``size`` (antialiased), randomly mirrored, scaled to [0, 1] and normalised with the model's
``(x - mean) / std``. A seed fixes them, so the same source, count, size and seed give the same array.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .errors import DataError

SKIMAGE_SOURCES = ("skimage:calib", "skimage:eval")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_HINT = "use skimage:calib, skimage:eval (pip install -e '.[images]') or a folder of .png/.jpg images"


def is_image_source(source: str) -> bool:
    """True for ``skimage:*`` and for a path that is (or is written as) a folder."""
    return source.startswith("skimage:") or source.endswith(("/", os.sep)) or Path(source).expanduser().is_dir()


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow", hint="pip install -e '.[images]'") from None
    return Image


def _rgb(im: np.ndarray) -> np.ndarray:
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    im = im[..., :3]
    if im.dtype != np.uint8:  # 16-bit or float samples: to 8 bits over their own range
        lo, hi = float(im.min()), float(im.max())
        im = ((im.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    return im


@functools.lru_cache(maxsize=4)
def load_images(source: str) -> tuple[tuple[str, np.ndarray], ...]:
    """``(file name, RGB uint8 [H, W, 3])`` of every image in ``source`` (DataError naming a bad source)."""
    if source.startswith("skimage:"):
        if source not in SKIMAGE_SOURCES:
            raise DataError(f"unknown image source {source!r}", hint=_HINT)
        try:
            import skimage
        except ImportError:
            raise DataError(f"{source} reads scikit-image's bundled sample images, and scikit-image is not "
                            "installed", hint="pip install -e '.[images]'") from None
        folder = Path(skimage.__file__).parent / "data"
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))
        files = files[0::2] if source == "skimage:calib" else files[1::2]
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder}", hint=_HINT)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})", hint=_HINT)
    Image = _pil()
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append((f.name, _rgb(np.asarray(im))))
        except OSError as exc:
            raise DataError(f"cannot read image {f}: {exc}", hint=_HINT) from exc
    return tuple(out)


def random_crop(im: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square of 60-100% of the short side, resized to ``size``, maybe mirrored: float [size, size, 3]
    in [0, 1]."""
    h, w = im.shape[:2]
    s = int(min(h, w) * rng.uniform(0.6, 1.0))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    Image = _pil()
    c = np.asarray(Image.fromarray(im[y:y + s, x:x + s]).resize((size, size), Image.Resampling.LANCZOS),
                   np.float32) / 255.0
    return c[:, ::-1] if rng.random() < 0.5 else c


def image_crops(source: str, n: int, size: int, *, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                seed: int = 0) -> np.ndarray:
    """``n`` normalised crops ``[n, 3, size, size]`` (float32) of ``source``'s images (see the module doc)."""
    if n < 1:
        raise DataError(f"number of images must be at least 1, got {n}", hint="set samples/windows to a positive number")
    if size < 1:
        raise DataError(f"image size must be at least 1, got {size}")
    images = load_images(source)
    rng = np.random.default_rng(seed)
    crops = [random_crop(images[i % len(images)][1], size, rng) for i in range(n)]
    x = (np.stack(crops) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)
