"""Visual Prompt Tuning (Jia et al. 2022, "Visual Prompt Tuning") on a frozen ViT-style image encoder
(HF `ViTModel`, `Dinov2Model`: rows of `architectures.ARCHITECTURES` with `modality="image"`).

    VPT-Shallow: [x_1, Z_1, E_1] = L_1([x_0, P, E_0])       prompts inserted once, after [CLS]
    VPT-Deep:    [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])   fresh prompts at every layer, the
                 previous layer's prompt outputs discarded

Only the prompts and a linear head on the last layer's [CLS] (or the mean of the patch tokens) train.
Prompts enter through PyTorch hooks, the same public extension point the weight methods use: a forward
hook on the architecture's `image_embeddings` module inserts P after [CLS], and (deep) a forward pre-hook
on each layer i >= 1 overwrites the prompt slots with P_i. Each batch row may carry its own prompts
(`PromptedEncoder.run(pixels, prompts)` with prompts (layers|1, rows|1, P, hidden)); L2P uses this.

`depth='prefix'` is the engine's key/value variant: per-layer keys/values before the image tokens at
every self-attention layer (a `RowPrefixes` through the registered attention functions, as P-tuning v2
on BERT). `depth='none'` has no prompt. The baselines are options of the same classifier (as
`ptuning-v2`'s are): `tune='head'` with `depth='none'` is a linear probe (frozen features are cached, so
each image runs the backbone once), `tune='full'` trains every encoder weight (with 'none': full
fine-tuning), `tune='lora'` adds LoRA (rank, alpha) on the table's `lora_targets`.

Registered as `vpt` (depth option), `vpt-shallow` and `vpt-deep` (the same class with that default).
The artifact is a `WeightArtifact`: 'prompts' (layers|1, P, hidden) or 'prefix.self', 'head.weight',
'head.bias', 'lora.<module>.A/B' or 'encoder.<name>', and in the metadata the labels and the image
processor (size, mean, std) the classifier was trained with.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import re
import weakref

import numpy as np
import torch
from torch import nn

from ..batching import IGNORE, Batch, Encoded
from ..config import ConfigError
from ..attention import RowPrefixes, use_prefix
from ..architectures import modules_matching
from ..models import model_name
from ..files import PrefixFileError
from ..vision import Image, ImageProcessor, vision_config
from .adapter import Bottleneck, adapter_sites
from .base import Method
from .configs import VPTConfig, VPTDeepConfig, VPTShallowConfig
from .lora import LoRALayer, linear_shape, lora_targets
from .weights import WeightArtifact

# ---------------------------------------------------------------------------------------------
# Prompts into a ViT-style encoder (hooks)


class PromptedEncoder:
    """Runs a frozen ViT-style encoder with per-row visual prompts inserted after [CLS].

    `run(pixels, prompts)`: prompts (1, rows|1, P, hidden) = shallow (inserted after the embeddings),
    (layers, rows|1, P, hidden) = deep (layer i >= 1 overwrites slots 1..P with prompts[i]).
    Returns the model's output (last_hidden_state: (rows, 1 + P + patches, hidden)).
    """

    def __init__(self, model, layout):
        arch = layout.arch
        if arch.modality == "text" or not arch.image_embeddings or not arch.blocks:
            raise ValueError(f"{model_name(model)} ({type(model).__name__}) is not an image encoder with an "
                             "`image_embeddings` entry in prefixtune/architectures.py:ARCHITECTURES; visual prompts need one "
                             "(ViTModel, Dinov2Model)")
        self.model = model
        found = modules_matching(model, arch.image_embeddings)
        if len(found) != 1:
            raise ValueError(f"expected one module matching {arch.image_embeddings!r}, found {sorted(found)}")
        self.embeddings = next(iter(found.values()))
        stack, pattern = next(iter(arch.blocks.items()))
        rx = re.compile(pattern.removesuffix(r"\.") + "$")
        layers = {int(m.group(1)): mod for name, mod in model.named_modules() if (m := rx.match(name))}
        self.layers = [layers[i] for i in range(len(layers))]
        self.active: torch.Tensor | None = None
        size = vision_config(model).image_size
        self.native = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolates = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.hooks = [self.embeddings.register_forward_hook(self._insert)]
        self.hooks += [layer.register_forward_pre_hook(self._replacer(i), with_kwargs=True)
                       for i, layer in enumerate(self.layers) if i > 0]

    def _insert(self, module, args, output):
        p = self.active
        if p is None:
            return None
        prompts = p[0].to(output.dtype)
        if prompts.shape[0] != output.shape[0]:
            prompts = prompts.expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], prompts, output[:, 1:]], dim=1)

    def _replacer(self, i: int):
        def hook(module, args, kwargs):
            p = self.active
            if p is None or p.shape[0] == 1:
                return None
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            prompts = p[i].to(h.dtype)
            if prompts.shape[0] != h.shape[0]:
                prompts = prompts.expand(h.shape[0], -1, -1)
            h = torch.cat([h[:, :1], prompts, h[:, 1 + prompts.shape[1]:]], dim=1)
            return (h, *rest), kwargs
        return hook

    @contextlib.contextmanager
    def prompting(self, prompts: torch.Tensor | None):
        if prompts is not None and (prompts.dim() != 4 or prompts.shape[0] not in (1, len(self.layers))):
            raise ValueError(f"prompts must be (1 or {len(self.layers)} layers, rows, P, hidden), got {tuple(prompts.shape)}")
        before, self.active = self.active, prompts
        try:
            yield
        finally:
            self.active = before

    def run(self, pixels: torch.Tensor, prompts: torch.Tensor | None = None, **kwargs):
        if self.interpolates and tuple(pixels.shape[-2:]) != self.native:
            kwargs.setdefault("interpolate_pos_encoding", True)   # ViT: position table resized for other sizes
        with self.prompting(prompts):
            return self.model(pixel_values=pixels, **kwargs)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def patch_size(model) -> int:
    p = vision_config(model).patch_size
    return p if isinstance(p, int) else p[0]


def xavier_prompts(shape, model, hidden: int) -> torch.Tensor:
    """VPT's initialization: uniform(-v, v), v = sqrt(6 / (3 * patch^2 + hidden))."""
    v = math.sqrt(6.0 / float(3 * patch_size(model) ** 2 + hidden))
    return torch.empty(shape).uniform_(-v, v)


class FeatureCache:
    """Frozen features of images, keyed by their pixel bytes (valid only while nothing before the head trains)."""

    def __init__(self):
        self.store: dict[bytes, torch.Tensor] = {}

    def get(self, pixels: torch.Tensor, compute) -> torch.Tensor:
        keys = [hashlib.blake2b(row.detach().cpu().float().numpy().tobytes(), digest_size=16).digest() + bytes(
            [torch.is_autocast_enabled(pixels.device.type)]) for row in pixels]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            with torch.no_grad():
                feats = compute(pixels[missing])
            for i, f in zip(missing, feats):
                self.store[keys[i]] = f.detach()
        return torch.stack([self.store[k] for k in keys]).to(pixels.device)


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _shared_cache(model, pool: str) -> FeatureCache:
    """One frozen-feature cache per (base model, pooling), shared by linear probes on that model (several
    seeds and learning rates then run the backbone once per image). Valid while the model is frozen:
    methods that train encoder weights never use it."""
    return _CACHES.setdefault(model, {}).setdefault(pool, FeatureCache())


class ImageClassifier(Method):
    """Shared by image classifier methods: images in, labels out, the image processor in the artifact."""

    kind = "classifier"
    mixable = False
    servable = False
    generates = False
    modality = "image"

    def _setup_images(self, tokenizer, image_size: int | None):
        base = tokenizer if isinstance(tokenizer, ImageProcessor) else ImageProcessor()
        self.processor = base.resized(image_size)
        p = patch_size(self.model)
        if self.processor.size % p:
            raise ConfigError(f"image_size {self.processor.size} is not a multiple of the patch size {p}")

    def label_index(self, target: str | None) -> int:
        if target is None:
            return IGNORE
        label = str(target).strip()
        if label not in self.config.labels:
            raise ValueError(f"target {target!r} is not one of the classifier's labels {list(self.config.labels)}")
        return self.config.labels.index(label)

    def encode(self, tokenizer, source, target, max_source_len: int = 0, max_target_len: int = 0) -> Encoded:
        """An image (`vision.Image` or uint8 (H, W, 3) array) stays uint8 until collate resizes a batch."""
        pixels = source.pixels if isinstance(source, Image) else np.asarray(source)
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"{self.name} classifies RGB images (H, W, 3); got a source of shape {pixels.shape}")
        return Encoded(pixels, [self.label_index(target)])

    def pixels(self, images) -> torch.Tensor:
        return self.processor([im.pixels if isinstance(im, Image) else np.asarray(im) for im in images])

    def collate(self, items: list[Encoded], pad_id: int) -> Batch:
        """Batch.input_ids holds the pixel values (rows, 3, S, S); labels (rows,) class indices."""
        x = self.processor([e.input_ids for e in items])
        labels = torch.tensor([e.labels[0] for e in items], dtype=torch.long)
        return Batch(x, torch.ones(len(items), 1, dtype=torch.long), labels, 0)

    def loss(self, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self.image_logits(batch.input_ids), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return self.image_logits(batch.input_ids).argmax(-1)
        finally:
            self.train(was)

    def forward(self, input_ids=None, attention_mask=None, labels=None, loss_on_targets: bool = False, **kwargs):
        if loss_on_targets:
            return self.loss(Batch(input_ids, attention_mask, labels, 0))
        return self.image_logits(input_ids if input_ids is not None else kwargs["pixel_values"])

    def generate(self, *args, **kwargs):
        raise TypeError(f"{self.name} is an image classifier: use predict() or prefixtune.vision.classify_images()")

    def image_meta(self) -> dict:
        return {**self.base_meta(), "labels": list(self.config.labels), "modality": self.modality,
                "processor": self.processor.to_dict()}

    @classmethod
    def _check_artifact(cls, model, artifact: WeightArtifact, source: str, check_fingerprint: bool = True):
        meta = artifact.meta
        if meta.get("method") != cls.name:
            raise PrefixFileError(f"{source}: was made by method {meta.get('method')!r}, not {cls.name!r}")
        if check_fingerprint:
            artifact.check_base(model, source)
        try:
            return cls.config_class.from_dict(meta["config"])
        except (KeyError, TypeError, ConfigError) as e:
            raise PrefixFileError(f"{source}: its config cannot be read ({e})") from e

    @staticmethod
    def _processor_of(meta: dict):
        p = meta.get("processor") or {}
        return ImageProcessor(size=int(p.get("size", 224)), mean=tuple(p.get("mean", ())) or ImageProcessor().mean,
                              std=tuple(p.get("std", ())) or ImageProcessor().std, rescale=float(p.get("rescale", 1 / 255)))

    @torch.no_grad()
    def load_named(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        want = {n: p for n, p in self.trainable().items()}
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or extra:
            raise PrefixFileError(f"{source}: a {self.name} artifact with this config holds {len(want)} tensors; "
                                  f"missing {missing[:5]}, unexpected {extra[:5]}")
        for name, p in want.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise PrefixFileError(f"{source}: {name!r} has shape {tuple(tensors[name].shape)}, needs {tuple(p.shape)}")
            p.copy_(tensors[name])

    @classmethod
    def from_artifact(cls, model, artifact: WeightArtifact, tokenizer=None, source: str = "artifact",
                      check_fingerprint: bool = True):
        config = cls._check_artifact(model, artifact, source, check_fingerprint)
        processor = cls._processor_of(artifact.meta)           # the preprocessing it was trained with
        text = getattr(tokenizer, "tokenizer", None) or (None if isinstance(tokenizer, ImageProcessor) else tokenizer)
        if text is not None:                                   # CLIP methods: the text tokenizer
            processor.tokenizer = text
        return cls.built_frozen(model, config, processor, lambda method: method.load_named(artifact.tensors, source))

    @classmethod
    def load(cls, path, model, tokenizer=None):
        return cls.from_artifact(model, WeightArtifact.load(path, model), source=str(path))

    def export(self) -> WeightArtifact:
        tensors = {n: p.detach().float().cpu().clone() if p.is_floating_point() else p.detach().cpu().clone()
                   for n, p in self.trainable().items()}
        return WeightArtifact(tensors, self.image_meta())

    def detach(self) -> None:
        pass


class VPTModel(ImageClassifier):
    """Visual prompts (shallow / deep / key-value) and a linear head on a frozen ViT-style encoder."""

    name = "vpt"
    config_class = VPTConfig
    summary = ("visual prompt tuning on a ViT/DINOv2 image encoder (--depth shallow|deep|prefix|none) + a linear "
               "head; linear probe, full fine-tuning, LoRA and adapter baselines as --depth none --tune head|full|lora|adapter")

    def __init__(self, model, config: VPTConfig | None = None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        cfg, layout = self.config, self.layout
        self._setup_images(tokenizer, cfg.image_size)
        self.encoder = PromptedEncoder(model, layout)
        hidden = layout.hidden_size
        n_layers = len(self.encoder.layers)
        if cfg.depth in ("shallow", "deep"):
            shape = (1 if cfg.depth == "shallow" else n_layers, cfg.length, hidden)
            self.prompts = nn.Parameter(xavier_prompts(shape, model, hidden).to(model.device))
        elif cfg.depth == "prefix":
            if "self" not in layout.shapes:
                raise ValueError(f"{model_name(model)} has no 'self' attention kind for key/value prompts")
            layers, heads, head_dim = layout.shapes["self"]
            self.prefix = nn.Parameter(torch.randn(layers, 2, heads, cfg.length, head_dim, device=model.device) * 0.02)
        self.prompt_dropout = nn.Dropout(cfg.prompt_dropout)
        self.head_dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(hidden, cfg.num_labels).to(model.device)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.01)
            self.head.bias.zero_()
        self._encoder: dict[str, nn.Parameter] = dict(model.named_parameters()) if cfg.tune == "full" else {}
        self._originals = {n: p.detach().to("cpu", copy=True) for n, p in self._encoder.items()}
        for p in self._encoder.values():
            p.requires_grad_(True)
        self._lora_hooks = []
        if cfg.tune == "lora":
            targets = dict(sorted(lora_targets(model, None).items()))
            self.lora = nn.ModuleDict({n.replace(".", "__"): LoRALayer(*linear_shape(m), cfg.rank, cfg.alpha / cfg.rank, 0.0)
                                       for n, m in targets.items()}).to(model.device)
            for n, m in targets.items():
                layer = self.lora[n.replace(".", "__")]
                self._lora_hooks.append(m.register_forward_hook(
                    lambda mod, args, out, layer=layer: out + layer(args[0]).to(out.dtype)))
        self._adapter_hooks = []
        if cfg.tune == "adapter":
            sites = adapter_sites(model)
            self.adapters = nn.ModuleDict({n.replace(".", "__"): Bottleneck(hidden, cfg.size or 8, "relu", 0.01)
                                           for n in sites}).to(model.device)
            for n, m in sites.items():
                self._adapter_hooks.append(m.register_forward_hook(
                    lambda mod, args, out, a=self.adapters[n.replace(".", "__")]: a(out)))
        self._cache = _shared_cache(model, cfg.pool) if cfg.depth == "none" and cfg.tune == "head" else None

    # -- what trains ---------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        own = {n: p for n, p in self.named_parameters()
               if not n.startswith("model.") and not n.startswith("lora.") and not n.startswith("adapters.")}
        if self.config.tune == "adapter":
            own.update({f"adapter.{n.replace('__', '.')}.{k}": p for n, a in self.adapters.items()
                        for k, p in a.named_parameters()})
        if self.config.tune == "lora":
            own.update({f"lora.{n.replace('__', '.')}.{part}": getattr(layer, part)
                        for n, layer in self.lora.items() for part in "AB"})
        return {**own, **{f"encoder.{n}": p for n, p in self._encoder.items()}}

    @torch.no_grad()
    def detach(self) -> None:
        """Remove the hooks and give the base model back as it was (original weights, frozen)."""
        self.encoder.remove()
        for h in self._lora_hooks + self._adapter_hooks:
            h.remove()
        self._lora_hooks.clear()
        self._adapter_hooks.clear()
        for name, value in self._originals.items():
            self.model.get_parameter(name).copy_(value)
        self._originals.clear()
        self._encoder.clear()
        self.model.requires_grad_(False)

    # -- forward -------------------------------------------------------------------------------
    def prompt_tensor(self) -> torch.Tensor | None:
        """(layers|1, 1, P, hidden) prompts for `PromptedEncoder.run`, or None."""
        if self.config.depth not in ("shallow", "deep"):
            return None
        return self.prompt_dropout(self.prompts).unsqueeze(1)

    def conditioning(self) -> RowPrefixes | None:
        if self.config.depth == "prefix":
            return RowPrefixes.shared({"self": self.prefix.to(self.model.dtype)})
        return None

    def hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden states (rows, 1 + P + patches, hidden) with this method's prompts."""
        pixels = pixels.to(self.model.dtype)
        with use_prefix(self.model, self.conditioning()):
            return self.encoder.run(pixels, self.prompt_tensor()).last_hidden_state

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        n_prompts = self.config.length if self.config.depth in ("shallow", "deep") else 0

        def compute(x):
            h = self.hidden(x)
            return h[:, 0] if self.config.pool == "cls" else h[:, 1 + n_prompts:].mean(1)

        if self._cache is not None:
            return self._cache.get(pixels, compute)
        return compute(pixels)

    def image_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.pooled(pixels).float()))


class VPTShallowModel(VPTModel):
    name = "vpt-shallow"
    config_class = VPTShallowConfig
    summary = "VPT-Shallow: prompt tokens after [CLS] at the input of a frozen ViT/DINOv2 + a linear head"


class VPTDeepModel(VPTModel):
    name = "vpt-deep"
    config_class = VPTDeepConfig
    summary = "VPT-Deep: fresh prompt tokens at every layer of a frozen ViT/DINOv2 + a linear head"


__all__ = ["VPTConfig", "VPTShallowConfig", "VPTDeepConfig", "VPTModel", "VPTShallowModel", "VPTDeepModel",
           "PromptedEncoder", "ImageClassifier"]
