"""Import from / export to Hugging Face PEFT adapter folders: prefix tuning, prompt tuning, LoRA.

A PEFT adapter folder is `adapter_config.json` + `adapter_model.safetensors`:
- PREFIX_TUNING: one tensor `prompt_embeddings` of shape (num_virtual_tokens, num_layers * 2 *
  token_dim), where token_dim = kv_heads * head_dim and each row views as (layers, 2, kv_heads,
  head_dim). PEFT's format has a single prefix set, so only decoder-only ('self') prefixes.
- PROMPT_TUNING: `prompt_embeddings` (num_virtual_tokens, hidden), the soft input embeddings in
  front of the input: prefixtune's `prompt` artifact (template [["v", n], ["s"]]).
- LORA: `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r) per adapted
  module, update (lora_alpha / r) * B @ A: prefixtune's `lora` artifact ('lora.<module>.A' / '.B').
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .methods.weights import WeightArtifact
from .prefix import MergedPrefix, PrefixFileError, atomic_write_bytes, check_compatible, read_safetensors

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def _write_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(folder / "adapter_model.safetensors", save(tensors))
    atomic_write_bytes(folder / "adapter_config.json", json.dumps(config, indent=2).encode())
    return folder


def _task_type(model) -> str | None:
    if model is None:
        return "CAUSAL_LM"
    return "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"


def export_peft(artifact, folder: str | Path, base_model_name: str | None = None, model=None) -> Path:
    """Write a prefix, prompt-tuning or LoRA artifact as a PEFT adapter folder.

    `model` (optional): the base model, to check the artifact against it and to record facts PEFT
    wants (task type; fan_in_fan_out for GPT-2's Conv1D layers)."""
    if isinstance(artifact, WeightArtifact):
        return _export_lora(artifact, folder, base_model_name, model)
    if artifact.embeds is not None:
        return _export_prompt(artifact, folder, base_model_name, model)
    return _export_prefix(artifact, folder, base_model_name, model)


def _export_prefix(prefix: MergedPrefix, folder, base_model_name, model) -> Path:
    if set(prefix.kv) != {"self"}:
        raise ValueError(
            f"PEFT's prefix-tuning format holds one prefix set (decoder self-attention), but this prefix has "
            f"{sorted(prefix.kv)} parts (encoder/decoder/cross-attention prefixes of an encoder-decoder model). "
            "Save it with prefixtune's own format instead (save_prefix).")
    kv = prefix.kv["self"]                                   # (layers, 2, heads, length, head_dim)
    layers, _, heads, length, head_dim = kv.shape
    # (layers, 2, heads, length, head_dim) -> (length, layers*2*heads*head_dim)
    rows = kv.permute(3, 0, 1, 2, 4).reshape(length, -1).contiguous().float()
    if model is not None:
        check_compatible(prefix, model)
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": length,
        "token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
        "encoder_hidden_size": heads * head_dim, "num_transformer_submodules": 1, "prefix_projection": False,
        "inference_mode": True, "base_model_name_or_path": base_model_name or prefix.meta.get("base_model"),
        "auto_mapping": None, "revision": None, "init_weights": None, "modules_to_save": None,
    }
    return _write_adapter(folder, {"prompt_embeddings": rows}, config)


def _export_prompt(prompt: MergedPrefix, folder, base_model_name, model) -> Path:
    n = prompt.embeds.shape[0]
    if prompt.kv or prompt.template != [["v", n], ["s"]]:
        raise ValueError(
            f"PEFT's prompt-tuning format holds soft embeddings in front of the input only; this "
            f"{prompt.meta.get('method', '?')!r} artifact has template {prompt.template} "
            f"{'and per-layer key/values' if prompt.kv else ''}. Save it with prefixtune's own format instead")
    if model is not None:
        check_compatible(prompt, model)
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": _task_type(model), "num_virtual_tokens": n,
        "token_dim": prompt.embeds.shape[1],
        # PEFT fills these from the base model's config when loading
        "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name or prompt.meta.get("base_model"),
        "auto_mapping": None, "revision": None, "modules_to_save": None,
    }
    return _write_adapter(folder, {"prompt_embeddings": prompt.embeds}, config)


def _export_lora(artifact: WeightArtifact, folder, base_model_name, model) -> Path:
    if artifact.method != "lora":
        raise ValueError(f"PEFT has no adapter format for prefixtune's {artifact.method!r} weights; of the weight "
                         "methods only 'lora' exports to PEFT. Save it with prefixtune's own format instead")
    from .methods.lora import LoRAConfig

    cfg = LoRAConfig.from_dict(artifact.meta["config"])
    tensors, modules = {}, []
    for name, t in artifact.tensors.items():
        module, part = name.removeprefix("lora.").rsplit(".", 1)
        tensors[f"{_PEFT_PREFIX}{module}.lora_{part}.weight"] = t
        modules.append(module)
    modules = sorted(set(modules))
    conv1d = False
    if model is not None:
        from .methods.lora import LoRAModel
        from .methods.weights import check_base

        check_base(artifact, model)
        targets = {name: m for name, m in model.named_modules() if name in set(modules)}
        conv1d = any(not isinstance(m, torch.nn.Linear) for m in targets.values())
        LoRAModel.from_artifact(model, artifact).detach()  # every tensor fits the model (names, shapes)
    config = {
        "peft_type": "LORA", "task_type": _task_type(model), "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": modules, "fan_in_fan_out": conv1d, "bias": "none",
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name or artifact.meta.get("base_model"),
        "auto_mapping": None, "revision": None,
    }
    return _write_adapter(folder, tensors, config)


def _read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise PrefixFileError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PrefixFileError(f"{config_path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise PrefixFileError(f"{config_path}: not a JSON object")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise PrefixFileError(f"{folder}: no adapter_model.safetensors (prefixtune reads only safetensors, never .bin pickles)")
    tensors, _ = read_safetensors(weights)
    return config, tensors, weights


def import_peft(folder: str | Path, model=None):
    """Read a PEFT adapter folder: PREFIX_TUNING (without prefix projection, or already merged) and
    PROMPT_TUNING give a `MergedPrefix`, LORA a `WeightArtifact` (method 'lora'). With `model`,
    refuse an adapter that does not fit it."""
    config, tensors, weights = _read_adapter(folder)
    kind = config.get("peft_type")
    if kind == "LORA":
        return _import_lora(config, tensors, weights, model)
    if kind == "PROMPT_TUNING":
        return _import_prompt(config, tensors, weights, model)
    if kind != "PREFIX_TUNING":
        raise PrefixFileError(f"{Path(folder) / 'adapter_config.json'}: peft_type is {kind!r}; prefixtune imports "
                              "PREFIX_TUNING, PROMPT_TUNING and LORA")
    if config.get("num_transformer_submodules", 1) != 1:
        raise PrefixFileError(f"{folder}: encoder-decoder PEFT prefixes (num_transformer_submodules=2) are not supported")
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


def _import_prompt(config: dict, tensors: dict, weights: Path, model) -> MergedPrefix:
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise PrefixFileError(f"{weights.parent}: a PEFT prompt with num_transformer_submodules="
                              f"{config['num_transformer_submodules']} also prompts the decoder; prefixtune's prompt "
                              "method prompts the (encoder) input only")
    if "prompt_embeddings" not in tensors:
        raise PrefixFileError(f"{weights}: no 'prompt_embeddings' tensor")
    rows = tensors["prompt_embeddings"]
    n = config.get("num_virtual_tokens")
    if rows.dim() != 2 or rows.shape[0] != n:
        raise PrefixFileError(f"{weights}: prompt_embeddings has shape {tuple(rows.shape)}, config says "
                              f"{n} virtual tokens")
    prompt = MergedPrefix(kv={}, embeds=rows.float(), meta={
        "method": "prompt", "template": [["v", n], ["s"]], "imported_from": "peft",
        "base_model": config.get("base_model_name_or_path")})
    if model is not None:
        check_compatible(prompt, model, source=str(weights.parent))
    return prompt


def _import_lora(config: dict, tensors: dict, weights: Path, model) -> WeightArtifact:
    from .methods.lora import LoRAConfig

    source = weights.parent / "adapter_config.json"
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise PrefixFileError(f"{source}: {key}=true is not plain LoRA; prefixtune imports plain LoRA only")
    if config.get("bias", "none") != "none":
        raise PrefixFileError(f"{source}: bias={config['bias']!r} trains biases too; prefixtune imports bias='none' only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise PrefixFileError(f"{source}: per-module ranks/alphas (rank_pattern, alpha_pattern) are not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise PrefixFileError(f"{source}: needs an int r >= 1 and a number lora_alpha, got r={rank!r}, "
                              f"lora_alpha={alpha!r}")
    if config.get("use_rslora"):  # rank-stabilized scale alpha/sqrt(r) == (alpha*sqrt(r))/r
        alpha = alpha * math.sqrt(rank)
    out, modules = {}, set()
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise PrefixFileError(f"{weights}: tensor {key!r} is not a LoRA A/B weight of a linear layer; prefixtune "
                                  "imports plain LoRA only (no embedding LoRA, no modules_to_save)")
        module, part = m.groups()
        if t.dim() != 2 or t.shape[0 if part == "A" else 1] != rank:
            raise PrefixFileError(f"{weights}: {key!r} has shape {tuple(t.shape)}, not rank {rank}")
        out[f"lora.{module}.{part}"] = t.float()
        modules.add(module)
    missing = [f"{m}.lora_{p}" for m in sorted(modules) for p in "AB" if f"lora.{m}.{p}" not in out]
    if missing or not modules:
        raise PrefixFileError(f"{weights}: {'missing ' + ', '.join(missing) if missing else 'no LoRA tensors'}")
    cfg = LoRAConfig(rank=rank, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
                     target_modules="^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$")
    meta = {"method": "lora", "config": cfg.to_dict(), "imported_from": "peft",
            "base_model": config.get("base_model_name_or_path")}
    artifact = WeightArtifact(out, meta)
    if model is not None:
        from .methods.lora import LoRAModel
        from .models import fingerprint

        try:
            LoRAModel.from_artifact(model, artifact).detach()  # names and shapes fit the model
        except (ValueError, PrefixFileError) as e:
            raise PrefixFileError(f"{weights.parent}: does not fit the model ({e})") from e
        artifact.meta["fingerprint"] = fingerprint(model)
    return artifact


def to_peft_model(prefix: MergedPrefix, model):
    """A PEFT PeftModel carrying `prefix` (used by tests and benchmarks to compare with PEFT)."""
    from peft import PrefixTuningConfig, get_peft_model

    layers, _, heads, length, head_dim = prefix.kv["self"].shape
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    rows = prefix.kv["self"].permute(3, 0, 1, 2, 4).reshape(length, -1)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(rows)
    return peft_model
