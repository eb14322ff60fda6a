"""torch.compile over a frozen model's transformer layers, with a prefix in place (opt-in:
`TrainConfig.compile`, `prefixtune train --compile`).

    from prefixtune.compiling import compiled_layers
    with compiled_layers(pm):             # pm: a method module (or its frozen HF model)
        ...                               # every transformer layer runs compiled; eager again after

Regional compilation, as PyTorch recommends for transformers: each layer's forward is compiled, and
identical layers share the compiled code, so compiling costs one layer's worth, not the model's.
prefixtune's attention functions run eagerly between the compiled parts (they are
`torch.compiler.disable`d in attention.py), so the prefix enters exactly as without compiling
(tests/test_compile.py: the same loss and gradients, within 1e-5). Batches of new lengths recompile
once, then dynamo marks the length dynamic.
"""

from __future__ import annotations

import contextlib

import torch

from .methods import Method

RECOMPILE_LIMIT = 64  # compiled versions of the layers' code kept before dynamo falls back to eager


@contextlib.contextmanager
def compiled_layers(model):
    """Within the block, every transformer layer of `model` runs through torch.compile."""
    # transformers.modeling_layers loads the model classes (seconds): only when compiling is switched on
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = model.model if isinstance(model, Method) else model
    layers = [m for m in hf.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(hf).__name__} has no transformer layers that transformers marks "
                         "(GradientCheckpointingLayer): nothing to compile")
    # a layer's own forward attribute, if it has one (accelerate's device-map hooks set one), is put back after
    before = {layer: vars(layer).get("forward") for layer in layers}
    for layer in layers:
        layer.forward = torch.compile(layer.forward)  # an instance attribute: the class's forward stays as it is
    try:
        # The layers' shared code is specialised on whether its input requires grad (layer 0's does not: only
        # the prefix is trained), on how transformers' wrappers pass it, on train/eval and on dynamic lengths.
        # SmolLM2 training needed more than dynamo's default 8 versions (then the rest ran eagerly) and 14
        # with the limit raised: RECOMPILE_LIMIT for the block.
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            yield layers
    finally:
        for layer, own in before.items():
            if own is None:
                del layer.forward  # the class's forward again: eager
            else:
                layer.forward = own
