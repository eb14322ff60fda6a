"""One recipe per canonical dataset: training and decoding settings and the metric task.

Looked up after alias resolution (`webnlg2017` is `webnlg`), so an alias gets the same metrics and
defaults as its dataset. The training values are the paper's prefix-tuning ones (§5.2, §5.3); a
method's own defaults (learning rate, per-task option values) come from its class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import ConfigError, TrainConfig
from .methods.registry import get_method  # torch-free to import; the method's class loads on use


@dataclass(frozen=True)
class Recipe:
    metric: str                                   # metrics task (prefixtune.metrics.score)
    train: dict = field(default_factory=dict)     # TrainConfig fields
    decode: dict = field(default_factory=dict)    # DecodeConfig fields


# Per-method values (learning rates, the paper's prefix lengths per task) are facts of each method
# class (`Method.learning_rate`, `Method.recipe_options`), so a new method needs no line here.
RECIPES: dict[str, Recipe] = {
    "e2e": Recipe("e2e", train=dict(lr=8e-5, epochs=5, batch_size=10)),
    "webnlg": Recipe("webnlg", train=dict(lr=5e-5, epochs=5, batch_size=5)),
    "dart": Recipe("dart", train=dict(lr=5e-5, epochs=10, batch_size=5)),
    "xsum": Recipe("xsum", train=dict(lr=5e-5, epochs=30, batch_size=14),
                   decode=dict(num_beams=6, length_penalty=0.8, max_new_tokens=60, max_source_len=512)),
    "boolq": Recipe("accuracy", train=dict(lr=1e-2, epochs=3, batch_size=16, max_source_len=256)),
    "jsonl": Recipe("generic"),
}


def canonical(dataset: str) -> str:
    # numpy: the data loaders import it, and the CLI imports this module (`prefixtune --help` start-up time)
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

    method_cls = get_method(method)
    cls = method_cls.config_class
    method_fields = {f.name for f in dataclasses.fields(cls)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = recipe_for(dataset)
    values = {**recipe.train, **method_defaults(method_cls, dataset),
              **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(values) - method_fields - train_fields
    if unknown:
        raise ConfigError(f"method {method!r} has no option(s) {sorted(unknown)}; its options: {sorted(method_fields)}")
    return (cls(**{k: v for k, v in values.items() if k in method_fields}),
            TrainConfig(**{k: v for k, v in values.items() if k in train_fields}))


def method_defaults(method_cls, dataset: str) -> dict:
    """The method's own defaults on `dataset`: its learning rate (if it has one) and per-task options."""
    out = {"lr": method_cls.learning_rate} if method_cls.learning_rate is not None else {}
    return {**out, **method_cls.recipe_options.get(canonical(dataset), {})}


def decode_settings(dataset: str) -> dict:
    return dict(recipe_for(dataset).decode)
