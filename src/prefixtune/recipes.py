"""One recipe per canonical dataset: training and decoding settings, metric task, per-method values.

Looked up after alias resolution (`webnlg2017` is `webnlg`), so an alias gets the same metrics and
defaults as its dataset. The prefix-tuning values are the paper's (§5.2, §5.3); values for other
methods are marked where they come from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    metric: str                                   # metrics task (prefixtune.metrics.score)
    train: dict = field(default_factory=dict)     # TrainConfig fields
    decode: dict = field(default_factory=dict)    # DecodeConfig fields
    methods: dict = field(default_factory=dict)   # method -> its config fields and TrainConfig overrides


# Other methods' learning rates, the same for every dataset. These are prefixtune's defaults, not the
# paper's (it gives per-dataset values for prefix-tuning only): soft input embeddings need larger
# steps than key/values (Lester et al. use 0.3 with Adafactor); LoRA 2e-4 as Hu et al. (2021) on E2E.
_COMMON_METHODS = {
    "prompt": {"lr": 3e-3},
    "ptuning": {"lr": 3e-3},
    "lora": {"lr": 2e-4},
    "finetune": {"lr": 5e-5},
    "ft-top": {"lr": 5e-5},
    "adapter": {"lr": 1e-4},
    "ptuning-v2": {"lr": 1e-2},
}


def _methods(**specific) -> dict:
    out = {k: dict(v) for k, v in _COMMON_METHODS.items()}
    for name, values in specific.items():
        out.setdefault(name.replace("_", "-"), {}).update(values)
    return out


RECIPES: dict[str, Recipe] = {
    "e2e": Recipe("e2e", train=dict(lr=8e-5, epochs=5, batch_size=10),
                  methods=_methods(prefix={"length": 5}, infix={"length": 5})),
    "webnlg": Recipe("webnlg", train=dict(lr=5e-5, epochs=5, batch_size=5),
                     methods=_methods(prefix={"length": 5}, infix={"length": 5})),
    "dart": Recipe("dart", train=dict(lr=5e-5, epochs=10, batch_size=5),
                   methods=_methods(prefix={"length": 10}, infix={"length": 10})),
    "xsum": Recipe("xsum", train=dict(lr=5e-5, epochs=30, batch_size=14),
                   decode=dict(num_beams=6, length_penalty=0.8, max_new_tokens=60, max_source_len=512),
                   methods=_methods(prefix={"length": 100, "mlp_hidden": 800})),
    "boolq": Recipe("accuracy", train=dict(lr=1e-2, epochs=3, batch_size=16, max_source_len=256),
                    methods=_methods()),
    "jsonl": Recipe("generic", methods=_methods()),
}


def canonical(dataset: str) -> str:
    from .data.registry import get_spec

    if str(dataset).lower().endswith(".jsonl"):
        return "jsonl"
    return get_spec(dataset).name


def recipe_for(dataset: str) -> Recipe:
    return RECIPES.get(canonical(dataset), RECIPES["jsonl"])


def configs_for(dataset: str, method: str, **overrides):
    """(method config, TrainConfig) for `method` on `dataset`: recipe values, then any non-None override.

    Overrides are field names of the method's config or of TrainConfig; an unknown one is refused.
    """
    from .config import ConfigError
    from .methods import get_method
    from .train import TrainConfig

    cls = get_method(method).config_class
    method_fields = {f.name for f in dataclasses.fields(cls)} - {"method"}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = recipe_for(dataset)
    values = {**recipe.train, **recipe.methods.get(method, {}), **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(values) - method_fields - train_fields
    if unknown:
        raise ConfigError(f"method {method!r} has no option(s) {sorted(unknown)}; its options: {sorted(method_fields)}")
    return (cls(**{k: v for k, v in values.items() if k in method_fields}),
            TrainConfig(**{k: v for k, v in values.items() if k in train_fields}))


def decode_settings(dataset: str) -> dict:
    return dict(recipe_for(dataset).decode)
