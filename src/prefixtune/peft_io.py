"""Import from / export to a Hugging Face PEFT prefix-tuning adapter folder.

PEFT stores a prefix-tuning adapter as `adapter_config.json` + `adapter_model.safetensors` with
one tensor `prompt_embeddings` of shape (num_virtual_tokens, num_layers * 2 * token_dim), where
token_dim = kv_heads * head_dim and each row views as (layers, 2, kv_heads, head_dim). PEFT's
format has a single prefix set, so only decoder-only ('self') prefixes can be exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .prefix import MergedPrefix, PrefixFileError, atomic_write_bytes, check_compatible, read_safetensors


def export_peft(prefix: MergedPrefix, folder: str | Path, base_model_name: str | None = None) -> Path:
    """Write `prefix` as a PEFT PREFIX_TUNING adapter folder (decoder-only prefixes only)."""
    from safetensors.torch import save

    if set(prefix.kv) != {"self"}:
        raise ValueError(
            f"PEFT's prefix-tuning format holds one prefix set (decoder self-attention), but this prefix has "
            f"{sorted(prefix.kv)} parts (encoder/decoder/cross-attention prefixes of an encoder-decoder model). "
            "Save it with prefixtune's own format instead (save_prefix).")
    kv = prefix.kv["self"]                                   # (layers, 2, heads, length, head_dim)
    layers, _, heads, length, head_dim = kv.shape
    # (layers, 2, heads, length, head_dim) -> (length, layers*2*heads*head_dim)
    rows = kv.permute(3, 0, 1, 2, 4).reshape(length, -1).contiguous().float()
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": length,
        "token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
        "encoder_hidden_size": heads * head_dim, "num_transformer_submodules": 1, "prefix_projection": False,
        "inference_mode": True, "base_model_name_or_path": base_model_name or prefix.meta.get("base_model"),
        "auto_mapping": None, "revision": None, "init_weights": None, "modules_to_save": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "adapter_model.safetensors", save({"prompt_embeddings": rows}))
    atomic_write_bytes(folder / "adapter_config.json", json.dumps(config, indent=2).encode())
    return folder


def import_peft(folder: str | Path, model=None) -> MergedPrefix:
    """Read a PEFT PREFIX_TUNING adapter folder (without prefix projection, or already merged)."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise PrefixFileError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PrefixFileError(f"{config_path}: invalid JSON ({e})") from e
    if config.get("peft_type") != "PREFIX_TUNING":
        raise PrefixFileError(f"{config_path}: peft_type is {config.get('peft_type')!r}, only PREFIX_TUNING can be imported")
    if config.get("num_transformer_submodules", 1) != 1:
        raise PrefixFileError(f"{config_path}: encoder-decoder PEFT prefixes (num_transformer_submodules=2) are not supported")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise PrefixFileError(f"{folder}: no adapter_model.safetensors (prefixtune reads only safetensors, never .bin pickles)")
    tensors, _ = read_safetensors(weights)
    key = next((k for k in tensors if k.endswith("prompt_embeddings")), None)
    if key is None:
        raise PrefixFileError(f"{weights}: no 'prompt_embeddings' tensor; a PEFT adapter saved with prefix_projection "
                              "must be saved in inference mode (merged) first")
    rows = tensors[key]
    length, layers, heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    head_dim = config["token_dim"] // heads
    if tuple(rows.shape) != (length, layers * 2 * heads * head_dim):
        raise PrefixFileError(f"{weights}: prompt_embeddings has shape {tuple(rows.shape)}, config implies "
                              f"{(length, layers * 2 * heads * head_dim)}")
    # (length, layers*2*heads*head_dim) -> (layers, 2, heads, length, head_dim)
    kv = rows.float().view(length, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
    prefix = MergedPrefix(kv={"self": kv}, meta={"method": "prefix", "imported_from": "peft",
                                                 "base_model": config.get("base_model_name_or_path")})
    if model is not None:
        check_compatible(prefix, model, source=str(folder))
    return prefix


def to_peft_model(prefix: MergedPrefix, model):
    """A PEFT PeftModel carrying `prefix` (used by tests and benchmarks to compare with PEFT)."""
    from peft import PrefixTuningConfig, get_peft_model

    layers, _, heads, length, head_dim = prefix.kv["self"].shape
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    rows = prefix.kv["self"].permute(3, 0, 1, 2, 4).reshape(length, -1)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(rows)
    return peft_model
