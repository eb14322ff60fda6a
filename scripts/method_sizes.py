"""Every method's size on the real models, for docs/methods.md's generated size table.

    python scripts/method_sizes.py                  # writes results/method-sizes/sizes.json
    prefixtune report                               # then rewrites the table from it

Each entry builds one method configuration on a real model (`prefixtune.build`), counts what the
optimizer updates (`num_trainable`: reparametrizations included) and what the artifact holds (the
saved tensors, reparametrizations dropped), and saves the artifact to measure its file. The numbers
depend only on the model and the configuration, not on the machine; they are recorded with the
versions that produced them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import prefixtune as pt  # noqa: E402  (after the path above: the checkout's own package)
from prefixtune.files import atomic_write_bytes  # noqa: E402
from prefixtune.methods import save_artifact  # noqa: E402

# (model, method, configuration, options): the configurations docs/methods.md describes
ENTRIES = [
    ("smollm2-135m", "prefix", "length 10, MLP 512", {"length": 10}),
    ("smollm2-135m", "prefix", "length 10, flat", {"length": 10, "reparam": "flat"}),
    ("smollm2-135m", "infix", "length 10, MLP 512", {"length": 10}),
    ("smollm2-135m", "prompt", "EMB-10", {"length": 10}),
    ("smollm2-135m", "ptuning", "template [P]*5 {source} [P]*5, LSTM",
     {"template": "[P]*5 {source} [P]*5", "encoder": "lstm"}),
    ("smollm2-135m", "ptuning", "template [P]*5 {source} [P]*5, MLP",
     {"template": "[P]*5 {source} [P]*5", "encoder": "mlp"}),
    ("smollm2-135m", "finetune", "every weight", {}),
    ("smollm2-135m", "ft-top", "layers 2: FT-top2", {"layers": 2}),
    ("smollm2-135m", "adapter", "fraction 0.03", {"fraction": 0.03}),
    ("smollm2-135m", "adapter", "fraction 0.001, the default", {}),
    ("smollm2-135m", "lora", "rank 8, alpha 16, q/v", {}),
    ("smollm2-135m", "ia3", "key, value and FFN-inner rescaling (defaults)", {}),
    ("minilm-l6", "ptuning-v2", "length 16, flat", {"length": 16}),
    ("minilm-l6", "ptuning-v2", "length 16, MLP 512", {"length": 16, "reparam": "mlp"}),
]


def measure(model, tok, method: str, options: dict, folder: Path) -> dict:
    built = pt.build(model, method, tok, **options)
    try:
        artifact = built.export()
        path = save_artifact(artifact, folder / f"{method}.safetensors", model=model)
        return {"trainable": built.num_trainable(), "artifact_values": sum(t.numel() for t in artifact.tensors.values()),
                "file_bytes": path.stat().st_size}
    finally:
        built.detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "method-sizes" / "sizes.json"))
    args = ap.parse_args(argv)
    import torch
    import transformers

    rows, loaded = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, method, configuration, options in ENTRIES:
            if model_name not in loaded:
                loaded[model_name] = pt.load_model(model_name)
            model, tok = loaded[model_name]
            base = sum(p.numel() for p in model.parameters())  # tied weights counted once (parameters() dedups)
            rows.append({"model": model_name, "base_params": base, "method": method, "configuration": configuration,
                         "options": options, **measure(model, tok, method, options, Path(tmp))})
            print(f"{model_name} {method} ({configuration}): {rows[-1]}")
    record = {"date": time.strftime("%Y-%m-%d"), "versions": {"prefixtune": pt.__version__, "torch": torch.__version__,
                                                             "transformers": transformers.__version__},
              "entries": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(args.out), (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
