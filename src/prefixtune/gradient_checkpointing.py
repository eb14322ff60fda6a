"""Gradient (activation) checkpointing with a prefix: less memory for long inputs, same gradients.

    from prefixtune.gradient_checkpointing import enable_gradient_checkpointing
    enable_gradient_checkpointing(pm)     # pm: a method module (or its frozen HF model)

(Run checkpoints, which make a killed run resumable, are train.py's.)

Hugging Face's own switch (`model.gradient_checkpointing_enable()`) does not work for a prefix
as is, for three reasons, each covered by tests/test_checkpointing.py:
  * HF checkpoints a layer only in training mode, and prefixtune keeps the frozen LM in eval mode:
    the switch is silently a no-op. Here each layer is put in training mode while it runs with
    gradients on (the layer object only: its sub-modules, dropout included, stay in eval mode).
  * The backward pass recomputes a layer after `use_prefix` has exited, so the recomputation
    would run without the prefix (torch raises a CheckpointError: shapes differ). Here torch's
    non-reentrant checkpoint gets a `context_fn` that restores the forward's active prefix.
  * The reentrant variant never sees the prefix as an input and gives it no gradient at all;
    it is not used.
"""

from __future__ import annotations

import contextlib

from .attention import reenter_active
from .methods import Method


def prefix_context():
    """`context_fn` for torch.utils.checkpoint: the recomputation sees the prefix the forward saw."""
    return contextlib.nullcontext(), reenter_active()


def _train_mode_when_grad(layer, args):
    layer.training = True  # only this layer's flag: HF checks it to decide whether to checkpoint


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint every transformer layer of `model` (a method module or a frozen HF model)."""
    # transformers.modeling_layers loads the model classes (seconds): only when checkpointing is switched on
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = model.model if isinstance(model, Method) else model
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                        "context_fn": prefix_context})
    for m in hf.modules():
        if isinstance(m, GradientCheckpointingLayer) and not getattr(m, "_prefixtune_checkpointing", False):
            m.register_forward_pre_hook(_train_mode_when_grad)
            m._prefixtune_checkpointing = True
