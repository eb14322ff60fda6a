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
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import safetensors.torch
import torch
from torch import nn

from . import __version__
from .config import PrefixConfig
from .files import PrefixFileError, atomic_write_bytes, read_file_bytes
from .models import fingerprint, model_name

FORMAT = "prefixtune.prefix/1"
# Shapes of one prefix: kind -> (layers, kv_heads, head_dim)
Shapes = dict[str, tuple[int, int, int]]


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
        return MergedPrefix(kv=kv, meta={"config": self.config.to_dict(), **meta})  # meta: the method's base_meta()


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
    # The artifact protocol (shared with methods.weights.WeightArtifact): mixable, method, tensors,
    # from_tensors, save, check_base, apply, row_conditioning.
    mixable: ClassVar[bool] = True  # shares a batch row by row with other soft artifacts

    @property
    def method(self) -> str:
        return self.meta.get("method", "?")

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors, as in the file: 'prefix.<kind>' key/values and 'embeds'."""
        out = {f"prefix.{k}": v for k, v in self.kv.items()}
        if self.embeds is not None:
            out["embeds"] = self.embeds
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "MergedPrefix":
        kv = {k.removeprefix("prefix."): v for k, v in tensors.items() if k.startswith("prefix.")}
        return cls(kv=kv, meta=meta, embeds=tensors.get("embeds"))

    def save(self, path: str | Path, model=None) -> Path:
        return save_prefix(self, path, model=model)

    def check_base(self, model, source: str = "prefix") -> None:
        """Refuse a model it was not made for (shapes, attention kinds, base-model fingerprint)."""
        check_compatible(self, model, source=source)

    @contextmanager
    def apply(self, model, tokenizer=None):
        """Use on `model` for the block: a soft artifact changes nothing in the model (it enters each
        batch row through the engine: `row_conditioning`), so this only checks that it fits."""
        self.check_base(model)
        yield self

    @property
    def row_conditioning(self) -> "MergedPrefix":
        """What the engine adds to each batch row once the artifact is applied: itself."""
        return self

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

def _looks_like_pickle(head: bytes) -> bool:
    """A torch.save zip, or a pickle (protocol 2+ starts with 0x80). A safetensors file starts with its
    header length, whose low byte may be 0x80 too, but its header (byte 8 on) is JSON: '{'."""
    return head.startswith(b"PK\x03\x04") or (head.startswith(b"\x80") and head[8:9] != b"{")


def save_prefix(prefix: MergedPrefix, path: str | Path, model=None) -> Path:
    """Save a merged prefix atomically. With `model`, records its name and fingerprint."""
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
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=str_meta))
    return Path(path)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file, refusing pickles and damaged files with a message naming the file.

    The whole file is read into memory and parsed from there (never memory-mapped), so the tensors
    own their memory: changing or truncating the file afterwards cannot alter or crash them."""
    path = Path(path)
    if not path.is_file():
        raise PrefixFileError(f"{path}: no such file")
    return parse_safetensors(read_file_bytes(path), str(path))


# safetensors dtype names -> torch dtypes (the ones a prefixtune or PEFT file can hold)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def safetensors_header(head: bytes, file_size: int, label: str) -> dict:
    """The parsed header of a safetensors file from its first bytes (8-byte length + JSON), checked
    against the file's size: every tensor's dtype, shape and byte range must fit and tile the data.
    Truncated, damaged and pickle files raise PrefixFileError naming `label`."""
    if _looks_like_pickle(head[:9]):
        raise PrefixFileError(f"{label}: this is a pickle / torch.save file; prefixtune loads only safetensors "
                              "files (pickles can run arbitrary code)")
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if n < 2 or n > file_size - 8:
        raise PrefixFileError(f"{label}: not a safetensors file, or truncated (header length does not fit the file)")
    if len(head) < 8 + n:
        raise ValueError("safetensors_header needs the whole header")
    try:
        header = json.loads(bytes(head[8:8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrefixFileError(f"{label}: damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise PrefixFileError(f"{label}: damaged safetensors header (not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PrefixFileError(f"{label}: damaged safetensors header (__metadata__ must map names to strings)")
    data_len, spans = file_size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise PrefixFileError(f"{label}: damaged safetensors header (tensor {name!r}: {str(info)[:80]})")
        begin, end = info["data_offsets"]
        itemsize = torch.tensor([], dtype=_DTYPES[info["dtype"]]).element_size() if info["dtype"] in _DTYPES else None
        if not 0 <= begin <= end or (itemsize is not None and end - begin != math.prod(info["shape"]) * itemsize):
            raise PrefixFileError(f"{label}: damaged safetensors header (tensor {name!r}: bytes {begin}-{end} do not "
                                  f"hold shape {info['shape']} of {info['dtype']})")
        if end > data_len:
            raise PrefixFileError(f"{label}: truncated: tensor {name!r} ends at byte {8 + n + end} but the file has "
                                  f"{file_size} bytes")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise PrefixFileError(f"{label}: damaged safetensors file (tensor {name!r} starts at data byte {begin}, "
                                  f"expected {at}: tensors overlap or leave a gap)")
        at = end
    if at != data_len:
        raise PrefixFileError(f"{label}: damaged safetensors file ({data_len - at} bytes after the last tensor)")
    return header


def parse_safetensors(data: bytes | bytearray, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`read_safetensors` for file contents already in memory; `label` names the file in errors.

    From a bytearray (`read_file_bytes`) the tensors are views of that buffer: no copy, and the
    buffer lives as long as they do. From bytes, the contents are copied once."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    header = safetensors_header(bytes(data[:8 + n] if 2 <= n <= len(data) - 8 else data[:9]), len(data), label)
    meta = header.get("__metadata__") or {}
    names = [k for k in header if k != "__metadata__"]
    if any(header[k]["dtype"] not in _DTYPES for k in names):  # an exotic dtype: safetensors' own loader
        try:
            return {k: v.clone() for k, v in safetensors.torch.load(bytes(data)).items()}, meta
        except Exception as e:  # safetensors raises several error types for damaged files
            raise PrefixFileError(f"{label}: damaged or not a safetensors file ({e})") from e
    buf = data if isinstance(data, bytearray) else bytearray(data)
    start = 8 + n
    tensors = {}
    for k in names:
        info = header[k]
        dtype, (begin, end) = _DTYPES[info["dtype"]], info["data_offsets"]
        itemsize = torch.tensor([], dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if count == 0:
            tensors[k] = torch.empty(info["shape"], dtype=dtype)
        elif (start + begin) % itemsize:  # unaligned (after an odd-sized tensor): an aligned copy
            tensors[k] = torch.frombuffer(bytearray(buf[start + begin:start + end]), dtype=dtype).view(info["shape"])
        else:
            tensors[k] = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).view(info["shape"])
    return tensors, meta


def read_metadata(path: str | Path) -> dict:
    """The decoded metadata of a safetensors file, from its header only (no tensors are read).

    Refuses pickles, damaged and truncated files (the header's byte ranges must fit the file) with a
    message naming the file."""
    return decode_meta(read_header(path).get("__metadata__") or {})


def read_header(path: str | Path) -> dict:
    """The checked safetensors header of a file (tensor dtypes, shapes, byte ranges; __metadata__),
    reading only the header's bytes."""
    path = Path(path)
    if not path.is_file():
        raise PrefixFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
            if 2 <= n <= size - 8:
                f.seek(0)
                head = f.read(8 + n)
    except OSError as e:
        raise PrefixFileError(f"{path}: cannot read ({e.strerror})") from None
    return safetensors_header(head, size, str(path))


def check_artifact_file(path: str | Path) -> dict:
    """Everything an artifact file decides by itself, checked before any model is loaded: a safetensors
    file (not a pickle, not truncated: every tensor's bytes inside the file), a prefixtune format, a
    well-formed fingerprint, and for a prefix / soft prompt (small: read whole) tensors that match
    its metadata's shapes and length and hold no NaN or inf. What needs the model (its shapes, its
    fingerprint) is checked when the file is loaded onto it. Returns the decoded metadata."""
    raw = read_header(path).get("__metadata__") or {}
    meta = decode_meta(raw)
    fmt = meta.get("format")
    if fmt not in (FORMAT, "prefixtune.weights/1"):
        raise PrefixFileError(f"{path}: not a prefixtune artifact file (format={fmt!r}, expected {FORMAT!r} or "
                              "'prefixtune.weights/1')")
    fp = raw.get("fingerprint")  # undecoded: "1234..." must stay a string
    if fp is not None and not re.fullmatch(r"[0-9a-f]{16}", fp):
        raise PrefixFileError(f"{path}: damaged metadata: fingerprint {str(fp)[:40]!r} is not 16 hex digits")
    if fmt == FORMAT:
        parse_prefix(read_file_bytes(path), str(path))
    return meta


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
    if not path.is_file():
        raise PrefixFileError(f"{path}: no such file")
    return parse_prefix(read_file_bytes(path), str(path), model, check_fingerprint)


def parse_prefix(data: bytes, label: str, model=None, check_fingerprint: bool = True) -> MergedPrefix:
    """`load_prefix` for file contents already in memory (what was hashed is what is parsed)."""
    tensors, raw_meta = parse_safetensors(data, label)
    meta = decode_meta(raw_meta)
    if meta.get("format") == "prefixtune.weights/1":
        raise PrefixFileError(f"{label}: holds the weights of method {meta.get('method')!r}, which change the model "
                              "itself: it cannot be used as a per-request prefix (load it with load_artifact)")
    if meta.get("format") != FORMAT:
        raise PrefixFileError(f"{label}: not a prefixtune prefix file (format={meta.get('format')!r}, expected {FORMAT!r})")
    shapes = meta.get("shapes") if isinstance(meta.get("shapes"), dict) else {}
    # the format defines one tensor per kind its metadata lists, and 'embeds' for soft prompts:
    # anything else is refused, so a file cannot carry (and a store cannot keep) data nobody reads
    unknown = sorted(set(tensors) - {f"prefix.{kind}" for kind in shapes} - {"embeds"})
    if unknown:
        raise PrefixFileError(f"{label}: holds tensors the prefix format does not define: {unknown} "
                              f"(expected only prefix.<kind> for kinds {sorted(shapes)}, and 'embeds')")
    kv = {k.removeprefix("prefix."): v for k, v in tensors.items() if k.startswith("prefix.")}
    embeds = tensors.get("embeds")
    if set(kv) != set(shapes) or (not kv and embeds is None):
        raise PrefixFileError(f"{label}: holds prefix tensors {sorted(kv)} but its metadata lists kinds {sorted(shapes)}")
    if embeds is not None:
        if embeds.ndim != 2 or (not kv and embeds.shape[0] != meta.get("length")):
            raise PrefixFileError(f"{label}: tensor 'embeds' has shape {tuple(embeds.shape)}; expected "
                                  f"(virtual tokens, hidden size) with {meta.get('length')} virtual tokens")
        if not torch.isfinite(embeds).all():
            raise PrefixFileError(f"{label}: tensor 'embeds' holds NaN or inf values")
    for kind, v in kv.items():
        want = shapes.get(kind)
        if v.ndim != 5 or v.shape[1] != 2 or want is None or [v.shape[0], v.shape[2], v.shape[4]] != list(want) \
                or v.shape[3] != meta.get("length"):
            raise PrefixFileError(f"{label}: tensor {kind!r} has shape {tuple(v.shape)}, which does not match its "
                                  f"metadata (shapes={meta.get('shapes')}, length={meta.get('length')})")
        if not torch.isfinite(v).all():
            raise PrefixFileError(f"{label}: tensor {kind!r} holds NaN or inf values")
    prefix = MergedPrefix(kv=kv, meta=meta, embeds=embeds)
    if model is not None:
        check_compatible(prefix, model, source=label, check_fingerprint=check_fingerprint)
    return prefix


def check_compatible(prefix: MergedPrefix, model, source: str = "prefix", check_fingerprint: bool = True) -> None:
    """Raise PrefixFileError unless `prefix` fits `model` (shapes, and the base-model fingerprint)."""
    # transformers: attention imports it; reading and writing prefix files does not need it (start-up time)
    from .attention import describe
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
    if check_fingerprint:
        refuse_other_base(prefix.meta, model, source)


def refuse_other_base(meta: dict, model, source: str) -> None:
    """THE fingerprint refusal, for every kind of artifact: raise PrefixFileError unless `model` has the
    fingerprint recorded in `meta` (no fingerprint recorded: nothing to check)."""
    want = meta.get("fingerprint")
    if want is None:
        return
    got = fingerprint(model)
    if want != got:
        raise PrefixFileError(
            f"{source}: {meta.get('method', 'artifact')} made for base model {meta.get('base_model')!r} (fingerprint "
            f"{want}), but the model {model_name(model)!r} has fingerprint {got} (another model, or one that "
            "already carries changed weights); an artifact only works on its own base model")



