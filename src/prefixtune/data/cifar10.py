"""CIFAR-10 images (Krizhevsky 2009) as image classification data, VTAB-1k style.

Files (``cifar10/`` in the data folder, as in the project's shared data): ``train_500_per_class.npz``
and ``test_500_per_class.npz``, each with ``images`` uint8 (N, 32, 32, 3) RGB, ``labels`` int 0-9 and
``classes`` (the ten names). Read with ``np.load(..., allow_pickle=False)``: no pickle.

Splits:
  * ``train`` / ``dev``: the VTAB-1k protocol (Zhai et al. 2019): 1,000 images sampled from the
    training file with ``seed`` (``train_size`` + ``val_size`` = 800 + 200), the first 800 train and
    the last 200 are the validation set that learning rates are chosen on;
  * ``test``: the test file (here half of the official test split: 500 per class, 5,000 images);
  * ``all``: the whole training file (5,000 here).
Each example is ``Example(source=Image(key, pixels), target=class name)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Dataset, Example, locate

HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
LICENSE = "CIFAR-10 (Krizhevsky 2009): cite; no formal licence"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FILES = {"train": "train_500_per_class.npz", "test": "test_500_per_class.npz"}
HOW = ("The official CIFAR-10 archive is a Python pickle, which prefixtune does not read: put .npz files with "
       "'images' (N, 32, 32, 3) uint8, 'labels' and 'classes' arrays in <data folder>/cifar10/ "
       "(the project's ../shared/data/cifar10 holds them).")


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
        classes = tuple(str(c) for c in z["classes"]) if "classes" in z else CLASSES
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels, classes


def vtab_indices(n: int, seed: int, train_size: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a seeded VTAB-1k-style sample of train_size + val_size out of n."""
    if train_size + val_size > n:
        raise ValueError(f"cifar10: train_size + val_size = {train_size + val_size} > {n} images in the file")
    order = np.random.default_rng(seed).permutation(n)[:train_size + val_size]
    return order[:train_size], order[train_size:]


def load(root: Path, split: str, *, seed: int = 0, train_size: int = 800, val_size: int = 200,
         classes: tuple[int, ...] | None = None) -> Dataset:
    """A split of CIFAR-10 (see the module docstring). `classes`: keep only these label indices (split
    CIFAR-10 tasks for continual learning)."""
    file_split = "test" if split == "test" else "train"
    path = locate(root, [f"cifar10/{FILES[file_split]}", FILES[file_split]], dataset="cifar10", split=split,
                  downloadable=False, how=HOW)
    images, labels, names = read_npz(path)
    if split in ("train", "dev"):
        tr, va = vtab_indices(len(images), seed, train_size, val_size)
        index = tr if split == "train" else va
    else:
        index = np.arange(len(images))
    if classes is not None:
        keep = set(int(c) for c in classes)
        index = np.array([i for i in index if int(labels[i]) in keep], dtype=np.int64)
    # torch: ..vision imports it; the data loaders stay importable without torch (CLI start-up time)
    from ..vision import Image

    examples = [Example(Image(f"cifar10/{file_split}/{int(i)}", images[i]), names[int(labels[i])]) for i in index]
    return Dataset("cifar10", split, examples, info={"file": str(path), "seed": seed, "train_size": train_size,
                                                     "val_size": val_size, "classes": list(names)})
