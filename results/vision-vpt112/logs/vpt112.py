import json, torch
torch.set_num_threads(1)
from pathlib import Path
from prefixtune import vision_experiments as vx
from prefixtune.models import load_model
out = Path("runs/exp-vpt112")
sc = vx.VisionScale(image_size=112, seeds=(0,))
splits = vx.vision_splits("/work/shared/data", sc.n_test)
model, proc = load_model("dinov2-small")
rows = []
for name, lr in (("probe", 1e-2), ("vpt-deep", 3e-3), ("lora", 1e-3)):   # the rates chosen on val at 56 px
    arm = vx.VPT_ARMS[name]
    row = vx.train_arm(model, proc, name, vx.Arm(arm.method, arm.options, (lr,)), lr, 0, splits, sc, out)
    rows.append(dict(vx.test_arm(model, proc, row, splits, sc, out), chosen=True))
    print(name, rows[-1]["test_accuracy"], flush=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "table.md").write_text(vx.vpt_table(rows, sc, "dinov2-small"))
