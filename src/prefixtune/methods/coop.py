"""Prompt learning for CLIP (HF `CLIPModel`): CoOp, CoCoOp and DAPL.

* **CoOp** (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): the hand-written text
  prompt "a photo of a [CLASS]." becomes M learnable context vectors [V]_1..[V]_M [CLASS]., shared by
  all classes (`class_specific=False`) or one set per class, with the class token at the end, in the
  middle (half the context before it) or at the front. Logits = CLIP's scale x cosine(image, text).
* **CoCoOp** (Zhou et al. 2022, "Conditional Prompt Learning"): a Meta-Net (Linear -> ReLU -> Linear,
  hidden = image-feature width / 16) maps each image's feature to a token pi added to every context
  vector, so each image gets its own prompts (the text tower runs images x classes prompts).
* **DAPL** (Ge et al. 2022, "Domain Adaptation via Prompt Learning"): prompt (class k, domain d) =
  [domain-agnostic context, M1][domain-specific context of d, M2][CLASS k]. The softmax runs over all
  (class, domain) prompts, so an image must match both its class and its domain (the objective that
  separates class from domain); labelled source images train with their (class, domain), unlabelled
  target images with CLIP's zero-shot pseudo-label when its probability is >= `threshold`.
  Prediction in domain d: the argmax over d's prompts.

How the context enters: a PyTorch forward hook on the text tower's token embedding writes each row's
context vectors at its context slots (the slots hold a placeholder token in `input_ids`, as CoOp's
"X X X X"), so CLIP's own code does the rest (positions, causal mask, pooling at the end-of-text token,
projection). A context initialised from words ("a photo of a") is therefore exactly those words
written in the prompt (tested), and zero training steps give CLIP's zero-shot classifier with that
template. Only the context (and CoCoOp's Meta-Net) trains; image features are frozen and cached.

The tokenizer is CLIP's (`load_model` of a CLIP folder returns the image processor with
`.tokenizer`); any tokenizer with `bos_token_id`, `eos_token_id` and `__call__(text,
add_special_tokens=False)` works.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..batching import Batch
from ..models import model_name
from .configs import CoCoOpConfig, CoOpConfig, DAPLConfig
from .vpt import ImageClassifier, FeatureCache

ZERO_SHOT_TEMPLATE = "a photo of a {}."


class _ContextWriter:
    """Forward hook on the token embedding: rows' context vectors written at their context slots."""

    def __init__(self, embedding: nn.Module):
        self.active = None
        self.hook = embedding.register_forward_hook(self._write)

    def _write(self, module, args, out):
        if self.active is None:
            return None
        rows, cols, values = self.active             # (n,), (n,), (n, hidden)
        return out.index_put((rows, cols), values.to(out.dtype))

    @contextlib.contextmanager
    def writing(self, rows, cols, values):
        before, self.active = self.active, (rows, cols, values)
        try:
            yield
        finally:
            self.active = before

    def remove(self):
        self.hook.remove()


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_features(model, input_ids, attention_mask=None) -> torch.Tensor:
    """CLIP's projected text features (rows, projection_dim)."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def image_features(model, pixels) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixels)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def clip_logits(model, image_feats, text_feats) -> torch.Tensor:
    """CLIP's logit scale x cosine; text_feats (classes, dim) or per image (rows, classes, dim)."""
    img = image_feats / image_feats.norm(dim=-1, keepdim=True)
    txt = text_feats / text_feats.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp()
    if txt.dim() == 3:
        return scale * torch.einsum("bd,bcd->bc", img, txt)
    return scale * img @ txt.T


@torch.no_grad()
def zero_shot_logits(model, tokenizer, pixels, classes, template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
    """CLIP zero-shot: prompts written out ("a photo of a {class}."), no learned context."""
    ids = [[tokenizer.bos_token_id] + _ids(tokenizer, template.format(c)) + [tokenizer.eos_token_id] for c in classes]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return clip_logits(model, image_features(model, pixels.to(model.dtype)), text_features(model, x, mask))


class CoOpModel(ImageClassifier):
    """CoOp: learnable context words in CLIP's text prompt, the class name written after (or inside) them."""

    name = "coop"
    config_class = CoOpConfig
    modality = "image-text"
    summary = ("CoOp on CLIP: M learnable context vectors replace 'a photo of a' (shared or per class; class "
               "token end/middle/front); zero-shot CLIP as the zero-step baseline")

    def __init__(self, model, config=None, tokenizer=None):
        super().__init__(model, config, tokenizer)
        if model.config.model_type != "clip" or not hasattr(model, "text_model"):
            raise ValueError(f"{self.name} needs a CLIPModel (image and text towers); {model_name(model)} "
                             f"({type(model).__name__}) is not one")
        text_tok = getattr(tokenizer, "tokenizer", None) or getattr(self, "_text_tokenizer", None)
        if text_tok is None:
            raise ValueError(f"{self.name} needs CLIP's text tokenizer: pass load_model(...)'s processor (it carries "
                             ".tokenizer) or tokenizer=... with .tokenizer set")
        self.text_tokenizer = text_tok
        self._setup_images(tokenizer, self.config.image_size)
        self.processor.tokenizer = text_tok
        self.embedding = model.text_model.embeddings.token_embedding
        self.writer = _ContextWriter(self.embedding)
        self.placeholder = self._placeholder()
        cfg = self.config
        self.class_ids = [_ids(text_tok, name) for name in cfg.labels]
        self.period = _ids(text_tok, ".")
        self._build_context()
        self._check_prompt_fits()
        self._cache = FeatureCache()  # the image tower is frozen: its features are cached per image

    def context_width(self) -> int:
        """Context tokens in one prompt (CoOp: M)."""
        return self.n_ctx

    def _check_prompt_fits(self):
        """Refuse, at build time, prompts longer than CLIP's text positions (its forward would fail later with
        a bare sequence-length error)."""
        limit = self.model.config.text_config.max_position_embeddings
        longest = max(range(len(self.class_ids)), key=lambda k: len(self.class_ids[k]))
        need = 2 + self.context_width() + len(self.class_ids[longest]) + len(self.period)   # <bos> ... <eos>
        if need > limit:
            raise ValueError(f"{self.name}: the prompt for class {self.config.labels[longest]!r} needs {need} tokens "
                             f"({self.context_width()} context) but the CLIP text model {model_name(self.model)} "
                             f"holds {limit}; use fewer context vectors (--length)")

    def _placeholder(self) -> int:
        ids = _ids(self.text_tokenizer, "X")
        return ids[0] if ids else 0

    def _init_context(self, length: int, init: str | None, count: int = 1) -> nn.Parameter:
        hidden = self.embedding.weight.shape[1]
        if init:
            with torch.no_grad():
                words = self.embedding.weight[torch.tensor(_ids(self.text_tokenizer, init))].float().clone()
            return nn.Parameter(words.unsqueeze(0).repeat(count, 1, 1).to(self.model.device))
        return nn.Parameter(torch.randn(count, length, hidden, device=self.model.device) * 0.02)

    def _build_context(self):
        cfg = self.config
        self.ctx = self._init_context(cfg.length, cfg.ctx_init, cfg.num_labels if cfg.class_specific else 1)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[1]

    # -- prompts --------------------------------------------------------------------------------
    def layout_prompt(self, class_index: int, groups: list[int]) -> tuple[list[int], list[int]]:
        """(input ids, context slot indices) of one class's prompt; `groups` are the context block sizes
        (CoOp: [M]; DAPL: [M1, M2]), all written together where the context stands."""
        n = sum(groups)
        name = self.class_ids[class_index]
        ctx = [self.placeholder] * n
        pos = self.config.class_position
        if pos == "end":
            body, slots = ctx + name, list(range(n))
        elif pos == "front":
            body, slots = name + ctx, list(range(len(name), len(name) + n))
        else:
            half = n // 2
            body = ctx[:half] + name + ctx[half:]
            slots = list(range(half)) + list(range(half + len(name), len(name) + n))
        ids = [self.text_tokenizer.bos_token_id] + body + self.period + [self.text_tokenizer.eos_token_id]
        return ids, [s + 1 for s in slots]

    def _batch_prompts(self, classes: list[int], groups: list[int]):
        laid = [self.layout_prompt(c, groups) for c in classes]
        width = max(len(ids) for ids, _ in laid)
        eos = self.text_tokenizer.eos_token_id
        x = torch.full((len(laid), width), eos, dtype=torch.long, device=self.model.device)
        mask = torch.zeros_like(x)
        rows, cols = [], []
        for i, (ids, slots) in enumerate(laid):
            x[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
            rows += [i] * len(slots)
            cols += slots
        return x, mask, torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)

    def encode_text(self, context: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """Text features (rows, dim) of prompts: row r = class classes[r] with context[r] (rows, M, hidden)."""
        x, mask, rows, cols = self._batch_prompts(classes, [context.shape[1]])
        with self.writer.writing(rows, cols, context.reshape(-1, context.shape[-1])):
            return text_features(self.model, x, mask)

    def class_context(self) -> torch.Tensor:
        """(classes, M, hidden): each class's context."""
        return self.ctx.expand(self.config.num_labels, -1, -1) if self.ctx.shape[0] == 1 else self.ctx

    def image_feats(self, pixels):
        return self._cache.get(pixels.to(self.model.dtype), lambda x: image_features(self.model, x).float())

    def image_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        txt = self.encode_text(self.class_context(), list(range(self.config.num_labels)))
        return clip_logits(self.model, self.image_feats(pixels), txt.float())

    def detach(self) -> None:
        self.writer.remove()

    def trainable(self):
        return {n: p for n, p in self.named_parameters() if not n.startswith("model.")}


class MetaNet(nn.Module):
    """CoCoOp's Meta-Net: Linear(d, d/16) -> ReLU -> Linear(d/16, hidden)."""

    def __init__(self, image_dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(image_dim, max(1, image_dim // 16))
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(max(1, image_dim // 16), hidden)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(x)))


class CoCoOpModel(CoOpModel):
    """CoCoOp: CoOp's context + pi(image) from a Meta-Net, per image."""

    name = "cocoop"
    config_class = CoCoOpConfig
    summary = "CoCoOp on CLIP: CoOp's context plus a Meta-Net token from each image's feature (instance-conditional)"

    def _build_context(self):
        super()._build_context()
        proj = self.model.config.projection_dim
        self.meta_net = MetaNet(proj, self.embedding.weight.shape[1]).to(self.model.device)

    def image_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        img = self.image_feats(pixels)                                        # (B, dim)
        pi = self.meta_net(img / img.norm(dim=-1, keepdim=True))              # (B, hidden)
        ctx = self.class_context()                                            # (C, M, hidden)
        b, c = img.shape[0], ctx.shape[0]
        shifted = ctx.unsqueeze(0) + pi[:, None, None, :]                     # (B, C, M, hidden)
        txt = self.encode_text(shifted.reshape(b * c, *ctx.shape[1:]), list(range(c)) * b).float()
        return clip_logits(self.model, img, txt.reshape(b, c, -1))


class DAPLModel(CoOpModel):
    """DAPL: [domain-agnostic context][domain-specific context][CLASS], softmax over (class, domain)."""

    name = "dapl"
    config_class = DAPLConfig
    summary = ("DAPL on CLIP: domain-agnostic + domain-specific context per (class, domain), trained over all "
               "(class, domain) prompts; unlabelled target images on confident zero-shot pseudo-labels")

    def _build_context(self):
        cfg = self.config
        self.ctx = self._init_context(cfg.length, cfg.ctx_init, 1)
        hidden = self.embedding.weight.shape[1]
        self.domain_ctx = nn.Parameter(torch.randn(len(cfg.domains), cfg.domain_length, hidden,
                                                   device=self.model.device) * 0.02)

    def context_width(self) -> int:
        return self.n_ctx + self.config.domain_length                    # agnostic M1 + domain-specific M2

    def all_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, domains x classes): prompt d*K + k = (domain d, class k)."""
        cfg = self.config
        k, d = cfg.num_labels, len(cfg.domains)
        agnostic = self.ctx.expand(k * d, -1, -1)
        specific = self.domain_ctx.repeat_interleave(k, dim=0)                 # (d*k, M2, hidden)
        context = torch.cat([agnostic, specific], dim=1)
        txt = self.encode_text(context, list(range(k)) * d).float()
        return clip_logits(self.model, self.image_feats(pixels), txt)

    def image_logits(self, pixels: torch.Tensor, domain: int | None = None) -> torch.Tensor:
        """Class logits in `domain` (default: the last one, the target domain)."""
        d = len(self.config.domains) - 1 if domain is None else domain
        k = self.config.num_labels
        return self.all_logits(pixels)[:, d * k:(d + 1) * k]

    # targets 'domain/label' ('domain/?' unlabelled); a bare label is in the first (source) domain
    def label_index(self, target):
        if target is None:
            return -100
        domain, sep, label = str(target).strip().rpartition("/")
        d = self.config.domains.index(domain) if sep else 0
        k = -1 if label == "?" else super().label_index(label)
        return d * (self.config.num_labels + 1) + (k + 1)           # packed (domain, class or -1)

    def loss(self, batch: Batch) -> torch.Tensor:
        k = self.config.num_labels
        packed = batch.labels
        domain, label = packed // (k + 1), packed % (k + 1) - 1
        logits = self.all_logits(batch.input_ids)
        if bool((label < 0).any()):  # unlabelled: CLIP's zero-shot pseudo-label where it is confident
            with torch.no_grad():
                zs = zero_shot_logits(self.model, self.text_tokenizer, batch.input_ids, self.config.labels).softmax(-1)
                conf, guess = zs.max(-1)
            label = torch.where(label < 0, torch.where(conf >= self.config.threshold, guess, torch.full_like(guess, -1)),
                                label)
        keep = label >= 0
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return nn.functional.cross_entropy(logits[keep], (domain * k + label)[keep])

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        k = self.config.num_labels
        domain = batch.labels // (k + 1)
        logits = self.all_logits(batch.input_ids).view(len(domain), -1, k)
        return logits[torch.arange(len(domain)), domain].argmax(-1)


__all__ = ["CoOpConfig", "CoCoOpConfig", "DAPLConfig", "CoOpModel", "CoCoOpModel", "DAPLModel", "zero_shot_logits",
           "ZERO_SHOT_TEMPLATE"]
