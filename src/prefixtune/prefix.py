"""The prefix itself: trainable parameters, the MLP reparametrization, merging, files.

A prefix holds, for each attention kind ('self', or 'encoder'/'decoder'/'cross') and each layer,
`length` key and value vectors per key/value head. Its canonical tensor layout is

    kv[kind]: (layers, 2, kv_heads, length, head_dim)      # 2 = (key, value)

Training optimizes `Prefix` (flat, or P = MLP(P') as in paper §4.3). `Prefix.merge()` computes
the final activations once and returns a `MergedPrefix`: plain tensors, no MLP, what is saved,
served and mixed in batches.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import PrefixConfig

FORMAT = "prefixtune.prefix/1"
# Shapes of one prefix: kind -> (layers, kv_heads, head_dim)
Shapes = dict[str, tuple[int, int, int]]


class PrefixFileError(ValueError):
    """A prefix file cannot be used; the message names the file and why."""


class Prefix(nn.Module):
    """Trainable prefix for every attention kind in `shapes` (the only trainable part of a model)."""

    def __init__(self, shapes: Shapes, config: PrefixConfig, hidden_size: int):
        super().__init__()
        self.config = config
        self.shapes = dict(shapes)
        L = config.length
        self.flat = nn.ParameterDict()
        self.embedding = nn.ParameterDict()
        self.mlp = nn.ModuleDict()
        d_in = config.mlp_input_dim or hidden_size
        for kind, (layers, heads, head_dim) in self.shapes.items():
            out_dim = layers * 2 * heads * head_dim
            if config.reparam == "flat":
                self.flat[kind] = nn.Parameter(torch.randn(L, out_dim) * config.init_std)
            else:
                self.embedding[kind] = nn.Parameter(torch.randn(L, d_in) * config.init_std)
                self.mlp[kind] = nn.Sequential(nn.Linear(d_in, config.mlp_hidden), nn.Tanh(), nn.Linear(config.mlp_hidden, out_dim))
        if config.init == "zeros":
            self.set_values({k: torch.zeros(s[0], 2, s[1], L, s[2]) for k, s in self.shapes.items()})

    @property
    def length(self) -> int:
        return self.config.length

    def forward(self) -> dict[str, torch.Tensor]:
        """kind -> (layers, 2, kv_heads, length, head_dim) prefix activations."""
        out = {}
        for kind, (layers, heads, head_dim) in self.shapes.items():
            rows = self.flat[kind] if self.config.reparam == "flat" else self.mlp[kind](self.embedding[kind])
            # (length, layers*2*heads*head_dim) -> (layers, 2, heads, length, head_dim)
            out[kind] = rows.view(self.length, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)
        return out

    @torch.no_grad()
    def set_values(self, values: dict[str, torch.Tensor]) -> None:
        """Make forward() return `values` (kind -> (layers, 2, heads, length, head_dim)).

        Flat: copied. MLP: P' and the first layer stay random; the last layer is solved by least
        squares so the MLP starts at exactly these values (exact when length <= mlp_hidden).
        """
        for kind, v in values.items():
            layers, heads, head_dim = self.shapes[kind]
            if v.shape != (layers, 2, heads, self.length, head_dim):
                raise ValueError(f"prefix values for {kind!r} have shape {tuple(v.shape)}, expected "
                                 f"{(layers, 2, heads, self.length, head_dim)}")
            # (layers, 2, heads, length, head_dim) -> (length, layers*2*heads*head_dim)
            target = v.permute(3, 0, 1, 2, 4).reshape(self.length, -1).to(torch.float32)
            if self.config.reparam == "flat":
                self.flat[kind].copy_(target)
                continue
            first, last = self.mlp[kind][0], self.mlp[kind][2]
            hidden = torch.tanh(first(self.embedding[kind].float()))           # (length, mlp_hidden)
            last.bias.zero_()
            solution = torch.linalg.lstsq(hidden.double(), target.double()).solution  # (mlp_hidden, out_dim)
            last.weight.copy_(solution.T.to(last.weight.dtype))

    def merge(self, **meta) -> "MergedPrefix":
        """The final prefix as plain tensors (the MLP is dropped)."""
        with torch.no_grad():
            kv = {k: v.detach().float().contiguous().clone() for k, v in self().items()}
        return MergedPrefix(kv=kv, meta={"method": self.config.method, "config": self.config.to_dict(), **meta})


@dataclass
class MergedPrefix:
    """A finished soft artifact: what is saved, served and mixed per row in batches.

    kv[kind]: (layers, 2, kv_heads, length, head_dim) key/values at every layer (prefix, infix,
              deep prompts), placed before the input, or between source and target when
              meta["insert"] == "target" (infix);
    embeds:   (virtual, hidden) soft input embeddings (prompt tuning, P-tuning), placed where
              meta["template"] says (see engine.lay_out).
    """

    kv: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    embeds: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Virtual tokens: key/value slots per layer, or soft embeddings."""
        if self.kv:
            return next(iter(self.kv.values())).shape[3]
        return 0 if self.embeds is None else self.embeds.shape[0]

    @property
    def shapes(self) -> Shapes:
        return {k: (v.shape[0], v.shape[2], v.shape[4]) for k, v in self.kv.items()}

    @property
    def is_infix(self) -> bool:
        return self.meta.get("insert") == "target"

    @property
    def template(self) -> list | None:
        """Where the soft embeddings go: [["v", n] | ["t", token ids] | ["s"], ...]; None: all before the source."""
        if self.embeds is None:
            return None
        return self.meta.get("template") or [["v", self.embeds.shape[0]], ["s"]]

    def num_values(self) -> int:
        return sum(v.numel() for v in self.kv.values()) + (0 if self.embeds is None else self.embeds.numel())

    def to(self, *args, **kwargs) -> "MergedPrefix":
        return MergedPrefix({k: v.to(*args, **kwargs) for k, v in self.kv.items()}, dict(self.meta),
                            None if self.embeds is None else self.embeds.to(*args, **kwargs))


# ---------------------------------------------------------------------------------------------
# Files: one safetensors file, merged tensors only, metadata as strings.

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ / torch.save zip


def _is_pickle(head: bytes) -> bool:
    """`head`: the first 9+ bytes. A safetensors file starts with its header length (8 bytes, little
    endian) and then '{': one whose length's low byte is 0x80 is not a pickle (1 file in 256)."""
    return head.startswith(_PICKLE_MAGIC) and head[8:9] != b"{"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_prefix(prefix: MergedPrefix, path: str | Path, model=None) -> Path:
    """Save a merged prefix atomically. With `model`, records its name and fingerprint."""
    from safetensors.torch import save

    from . import __version__
    from .models import fingerprint, model_name

    meta = dict(prefix.meta)
    if model is not None:
        meta.setdefault("base_model", model_name(model))
        meta["fingerprint"] = fingerprint(model)
    meta.update(format=FORMAT, length=prefix.length, shapes={k: list(s) for k, s in prefix.shapes.items()},
                library_version=__version__, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not all(torch.isfinite(v).all() for v in [*prefix.kv.values(), *([prefix.embeds] if prefix.embeds is not None else [])]):
        raise PrefixFileError(f"{path}: refusing to write NaN or inf values (training diverged?)")
    tensors = {f"prefix.{k}": v.detach().float().contiguous().cpu() for k, v in prefix.kv.items()}
    if prefix.embeds is not None:
        tensors["embeds"] = prefix.embeds.detach().float().contiguous().cpu()
    str_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    atomic_write_bytes(path, save(tensors, metadata=str_meta))
    return Path(path)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file, refusing pickles and damaged files with a message naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PrefixFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_pickle(head):
        raise PrefixFileError(f"{path}: this is a pickle / torch.save file; prefixtune loads only safetensors "
                              "files (pickles can run arbitrary code)")
    if len(head) < 8 or int.from_bytes(head[:8], "little") > path.stat().st_size - 8:
        raise PrefixFileError(f"{path}: not a safetensors file, or truncated (header length does not fit the file)")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises several error types for damaged files
        raise PrefixFileError(f"{path}: damaged or not a safetensors file ({e})") from e
    return tensors, meta


def read_metadata(path: str | Path) -> dict:
    """The decoded metadata of a safetensors file, from its header only (no tensors are read).

    Refuses pickles and damaged files with a message naming the file."""
    import struct

    path = Path(path)
    if not path.is_file():
        raise PrefixFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
        if _is_pickle(head):
            raise PrefixFileError(f"{path}: this is a pickle / torch.save file; prefixtune loads only safetensors "
                                  "files (pickles can run arbitrary code)")
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else -1
        f.seek(8)
        if n < 2 or n > path.stat().st_size - 8:
            raise PrefixFileError(f"{path}: not a safetensors file, or truncated (header length does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PrefixFileError(f"{path}: damaged safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise PrefixFileError(f"{path}: damaged safetensors header")
    return decode_meta(header.get("__metadata__") or {})


def read_format(path: str | Path) -> str | None:
    return read_metadata(path).get("format")


def decode_meta(meta: dict[str, str]) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def load_prefix(path: str | Path, model=None, check_fingerprint: bool = True) -> MergedPrefix:
    """Load a prefix file; with `model`, refuse it unless it was made for that base model and shape."""
    path = Path(path)
    tensors, raw_meta = read_safetensors(path)
    meta = decode_meta(raw_meta)
    if meta.get("format") != FORMAT:
        raise PrefixFileError(f"{path}: not a prefixtune prefix file (format={meta.get('format')!r}, expected {FORMAT!r})")
    kv = {k.removeprefix("prefix."): v for k, v in tensors.items() if k.startswith("prefix.")}
    embeds = tensors.get("embeds")
    unknown = sorted(set(tensors) - {f"prefix.{k}" for k in kv} - {"embeds"})
    if unknown:
        raise PrefixFileError(f"{path}: holds tensors this format does not define: {unknown}")
    if not kv and embeds is None:
        raise PrefixFileError(f"{path}: holds no prefix tensors")
    if embeds is not None:
        if embeds.ndim != 2 or (not kv and embeds.shape[0] != meta.get("length")):
            raise PrefixFileError(f"{path}: tensor 'embeds' has shape {tuple(embeds.shape)}; expected "
                                  f"(virtual tokens, hidden size) with {meta.get('length')} virtual tokens")
        if not torch.isfinite(embeds).all():
            raise PrefixFileError(f"{path}: tensor 'embeds' holds NaN or inf values")
    for kind, v in kv.items():
        want = meta.get("shapes", {}).get(kind)
        if v.ndim != 5 or v.shape[1] != 2 or want is None or [v.shape[0], v.shape[2], v.shape[4]] != list(want) \
                or v.shape[3] != meta.get("length"):
            raise PrefixFileError(f"{path}: tensor {kind!r} has shape {tuple(v.shape)}, which does not match its "
                                  f"metadata (shapes={meta.get('shapes')}, length={meta.get('length')})")
        if not torch.isfinite(v).all():
            raise PrefixFileError(f"{path}: tensor {kind!r} holds NaN or inf values")
    prefix = MergedPrefix(kv=kv, meta=meta, embeds=embeds)
    if model is not None:
        check_compatible(prefix, model, source=str(path), check_fingerprint=check_fingerprint)
    return prefix


def check_compatible(prefix: MergedPrefix, model, source: str = "prefix", check_fingerprint: bool = True) -> None:
    """Raise PrefixFileError unless `prefix` fits `model` (shapes, and the base-model fingerprint)."""
    from .engine import describe
    from .models import fingerprint, model_name

    layout = describe(model)
    if prefix.embeds is not None and prefix.embeds.shape[1] != layout.embeddings.embedding_dim:
        raise PrefixFileError(f"{source}: soft prompt vectors have width {prefix.embeds.shape[1]} but "
                              f"{model_name(model)} embeds tokens in {layout.embeddings.embedding_dim}")
    if prefix.is_infix and (layout.is_encoder_decoder or not layout.arch.infix):
        raise PrefixFileError(f"{source}: is an infix, which needs a decoder-only model with rotary or absolute "
                              f"positions; {model_name(model)} is not one")
    for kind, shape in prefix.shapes.items():
        if kind not in layout.shapes:
            raise PrefixFileError(f"{source}: has a {kind!r} prefix but {model_name(model)} has attention kinds "
                                  f"{sorted(layout.shapes)}")
        if tuple(shape) != tuple(layout.shapes[kind]):
            raise PrefixFileError(f"{source}: {kind!r} prefix has (layers, kv_heads, head_dim)={tuple(shape)} but "
                                  f"{model_name(model)} needs {tuple(layout.shapes[kind])}")
    want = prefix.meta.get("fingerprint")
    if check_fingerprint and want is not None:
        got = fingerprint(model)
        if want != got:
            raise PrefixFileError(
                f"{source}: made for base model {prefix.meta.get('base_model')!r} (fingerprint {want}), but the "
                f"loaded model {model_name(model)!r} has fingerprint {got}; a prefix only works on its own base model")



