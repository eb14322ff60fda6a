"""Import from / export to Hugging Face PEFT adapter folders.

A PEFT adapter folder is `adapter_config.json` + `adapter_model.safetensors`. Each method that has a
PEFT counterpart says so (`Method.peft_type`) and converts its own artifacts (`Method.to_peft`,
`Method.from_peft`, in its own file); this module reads and writes the folder and picks the method.
Today: PREFIX_TUNING (prefix), PROMPT_TUNING (prompt), LORA (lora), and whatever a registered method adds.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from .methods import METHODS, artifact_method
from .prefix import read_safetensors
from .files import PrefixFileError, atomic_write_bytes


def _write_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(folder / "adapter_model.safetensors", safetensors.torch.save(tensors))
    atomic_write_bytes(folder / "adapter_config.json", json.dumps(config, indent=2).encode())
    return folder


def export_peft(artifact, folder: str | Path, base_model_name: str | None = None, model=None) -> Path:
    """Write an artifact of a method with a PEFT format as a PEFT adapter folder.

    `model` (optional): the base model, to check the artifact against it and to record facts PEFT
    wants (task type; fan_in_fan_out for GPT-2's Conv1D layers)."""
    method = artifact_method(artifact)
    if method.peft_type is None:
        with_format = ", ".join(n for n, cls in METHODS.items() if cls.peft_type)
        raise ValueError(f"PEFT has no adapter format for prefixtune's {method.name!r} artifacts (methods that "
                         f"export to PEFT: {with_format}); save it with prefixtune's own format instead")
    tensors, fields = method.to_peft(artifact, model)
    config = {"peft_type": method.peft_type, **fields, "inference_mode": True,
              "base_model_name_or_path": base_model_name or artifact.meta.get("base_model"),
              "auto_mapping": None, "revision": None, "modules_to_save": None}
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
    """Read a PEFT adapter folder into the artifact of the method with that `peft_type` (PREFIX_TUNING
    without prefix projection or already merged, PROMPT_TUNING, LORA, ...). With `model`, refuse an
    adapter that does not fit it."""
    config, tensors, weights = _read_adapter(folder)
    kind = config.get("peft_type")
    readers: dict[str, type] = {}
    for cls in METHODS.values():  # the first registered method of a format reads it (prompt, not ptuning)
        if cls.peft_type:
            readers.setdefault(cls.peft_type, cls)
    if kind not in readers:
        raise PrefixFileError(f"{Path(folder) / 'adapter_config.json'}: peft_type is {kind!r}; prefixtune imports "
                              f"{', '.join(readers)}")
    return readers[kind].from_peft(config, tensors, str(folder), model)


def to_peft_model(prefix, model):
    """A PEFT PeftModel carrying a prefix (used by tests and benchmarks to compare with PEFT)."""
    return artifact_method(prefix).to_peft_model(prefix, model)
