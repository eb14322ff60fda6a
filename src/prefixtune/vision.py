"""Images as first-class data: the image processor, image examples, loading image encoders, and
classifier evaluation (accuracy, per-class accuracy, intervals).

    model, proc = pt.load_model("dinov2-small")            # Dinov2Model + ImageProcessor (224 px, ImageNet mean/std)
    ds = load_dataset("cifar10", "train", data_dir="../shared/data")   # 800 VTAB-1k images: Example(Image, label)
    method = pt.build(model, "vpt-deep", proc, length=10)
    train(method, proc, ds.examples, dev.examples, TrainConfig(...), "runs/vpt")   # the one trainer

An image method's "tokenizer" is an `ImageProcessor`: it turns uint8 HxWx3 images into normalized
(3, S, S) tensors (resize to S = the processor's crop size or the method's `image_size`, then
mean/std from the model's `preprocessor_config.json`), and has `pad_token_id` so the trainer's
text-shaped protocol (encode -> collate -> loss) carries images unchanged: an image method's
`Batch.input_ids` holds the pixel values (rows, 3, S, S).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from PIL import Image as PILImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, eq=False)
class Image:
    """One image as a data source: `key` names it (equality and hashing use the key only, so datasets
    can group and look images up like text sources); `pixels` is uint8 (H, W, 3) RGB."""

    key: str
    pixels: np.ndarray = field(repr=False)

    def __eq__(self, other) -> bool:
        return isinstance(other, Image) and other.key == self.key

    def __hash__(self) -> int:
        return hash(("image", self.key))

    def __str__(self) -> str:
        return self.key


def read_image(path: str | Path) -> Image:
    """An image file (any format Pillow reads) as an RGB `Image`."""
    with PILImage.open(path) as im:
        return Image(str(path), np.asarray(im.convert("RGB"), dtype=np.uint8).copy())


@dataclass
class ImageProcessor:
    """Resize + normalize for one image encoder; the "tokenizer" of image methods (see module docstring).

    Images are resized straight to `size` x `size` (bicubic, antialiased, in torch): the processor
    configs' "resize the short side to 256, center-crop 224" is for photos larger than the crop, and
    would only cut the border of CIFAR's 32x32 images.
    """

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    rescale: float = 1 / 255
    pad_token_id: int = 0           # the trainer's protocol asks for one; images are never padded
    eos_token_id: int | None = None

    @classmethod
    def from_config(cls, config: dict, size: int | None = None) -> "ImageProcessor":
        """From a `preprocessor_config.json` dict (crop_size, else size, else 224)."""
        if size is None:
            crop = config.get("crop_size") or config.get("size") or {}
            if isinstance(crop, int):
                size = crop
            else:
                size = crop.get("height") or crop.get("shortest_edge") or 224
        return cls(size=int(size), mean=tuple(config.get("image_mean", IMAGENET_MEAN)),
                   std=tuple(config.get("image_std", IMAGENET_STD)), rescale=float(config.get("rescale_factor", 1 / 255)))

    @classmethod
    def from_pretrained(cls, folder: str | Path, size: int | None = None) -> "ImageProcessor":
        path = Path(folder) / "preprocessor_config.json"
        if path.exists():
            return cls.from_config(json.loads(path.read_text()), size)
        try:  # a Hub id
            return cls.from_config(json.loads(Path(hf_hub_download(str(folder), "preprocessor_config.json")).read_text()),
                                   size)
        except Exception:
            return cls(size=size or 224)

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "rescale": self.rescale}

    def resized(self, size: int | None) -> "ImageProcessor":
        return self if size is None or size == self.size else ImageProcessor(size, self.mean, self.std, self.rescale)

    def __call__(self, images) -> torch.Tensor:
        """uint8 images (a list of (H, W, 3) arrays / `Image`s, or one (N, H, W, 3) array) -> (N, 3, S, S) float32."""
        if isinstance(images, Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        arrays = [im.pixels if isinstance(im, Image) else np.asarray(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) == 1:
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
            return self._resize_normalize(x)
        return torch.cat([self(a[None]) for a in arrays])

    def _resize_normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"images must be RGB (H, W, 3); got {x.shape[1]} channels")
        x = x * self.rescale
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                               antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Models


def shared_folder_root() -> Path:
    """The project's shared models folder: $PREFIXTUNE_SHARED_MODELS, else ../shared/models beside the checkout."""
    env = os.environ.get("PREFIXTUNE_SHARED_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "models"


def shared_model_folder(spec: dict) -> Path | None:
    """Where a short name's offline copy is ($ENV, then the shared models folder); None: use the Hub."""
    env = os.environ.get(spec.get("folder_env", ""), "")
    for folder in ([Path(env)] if env else []) + [shared_folder_root() / spec["shared_folder"]]:
        if (folder / "config.json").exists():
            return folder
    return None


def load_image_model(target: str, config, name: str, dtype=torch.float32, attn_implementation: str | None = None):
    """(frozen image encoder or CLIPModel, its ImageProcessor). For CLIP the processor also carries the
    text tokenizer (`processor.tokenizer`)."""
    # transformers' Auto classes: only when an image model loads (importing them takes seconds)
    from transformers import AutoModel

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModel.from_pretrained(target, config=config, **kwargs)  # safetensors (transformers' default)
    model.eval().requires_grad_(False)  # frozen, as models.load_model leaves every base model
    model._prefixtune_name = name
    processor = ImageProcessor.from_pretrained(target)
    if getattr(config, "model_type", "") == "clip":
        # transformers' Auto classes: only when an image model loads (importing them takes seconds)
        from transformers import AutoTokenizer

        processor.tokenizer = AutoTokenizer.from_pretrained(target)
    return model, processor


def vision_config(model):
    """The config describing the image tower (CLIP: its vision_config)."""
    return getattr(model.config, "vision_config", model.config)


# ---------------------------------------------------------------------------------------------
# Evaluation


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def label_of(item) -> str:
    target = getattr(item, "target", None)
    if target is None:
        target = item.references[0]
    return target


@torch.no_grad()
def predict_images(method, images: list, batch_size: int = 64, bf16: bool = False) -> torch.Tensor:
    """(N, num_labels) logits of an image classifier method for `images` (`Image`s or uint8 arrays)."""
    out = []
    was = method.training
    method.eval()
    try:
        for start in range(0, len(images), batch_size):
            pixels = method.pixels(images[start:start + batch_size]).to(method.model.device)
            with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
                out.append(method.image_logits(pixels).float().cpu())
    finally:
        method.train(was)
    return torch.cat(out) if out else torch.zeros(0, len(method.config.labels))


def evaluate_images(method, items, batch_size: int = 64, bf16: bool = False) -> dict:
    """Accuracy (with a 95% Wilson interval), per-class accuracy, the confusion matrix and the mean
    cross-entropy of an image classifier on `items` (Examples or EvalItems whose source is an `Image`)."""
    items = list(items)
    if not items:
        raise ValueError("evaluate_images: no items")
    labels = list(method.config.labels)
    gold = []
    for it in items:
        name = label_of(it).strip()
        if name not in labels:
            raise ValueError(f"label {name!r} is not one of the classifier's labels {labels}")
        gold.append(labels.index(name))
    logits = predict_images(method, [it.source for it in items], batch_size, bf16)
    pred = logits.argmax(-1).tolist()
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    correct = sum(confusion[i][i] for i in range(k))
    per_class = {labels[i]: (confusion[i][i] / sum(confusion[i]) if sum(confusion[i]) else None) for i in range(k)}
    low, high = wilson_interval(correct, len(items))
    loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(gold)))  # over all classes, no task mask
    return {"accuracy": correct / len(items), "ci95": [low, high], "correct": correct, "n": len(items),
            "per_class": per_class, "confusion": confusion, "predictions": pred, "gold": gold, "loss": loss}


def classify_images(method, images: list, top: int = 3) -> list[list[tuple[str, float]]]:
    """Per image: the `top` labels with their probabilities."""
    probs = predict_images(method, images).softmax(-1)
    labels = method.config.labels
    out = []
    for row in probs:
        values, idx = row.topk(min(top, row.shape[0]))
        out.append([(labels[i], float(v)) for v, i in zip(values.tolist(), idx.tolist())])
    return out


def is_image_artifact(meta: dict) -> bool:
    return meta.get("modality") in ("image", "image-text")


__all__ = ["Image", "ImageProcessor", "read_image", "load_image_model", "evaluate_images", "classify_images",
           "predict_images", "wilson_interval"]
