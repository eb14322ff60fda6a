"""Visual prompt tuning on ViT-style encoders (methods/vpt.py) and image data (vision.py, data/cifar10.py).

Exactness on tiny seeded random ViT and DINOv2 models, under sdpa and eager, against references computed
without the method's hooks:
  * VPT-shallow with prompts taken from real patch embeddings == the model's own encoder run on the
    concatenated token sequence [CLS, prompts, patches];
  * VPT-deep == a hand-written layer loop that overwrites the prompt slots before every layer >= 1;
  * key/value prompts (depth 'prefix', the engine) == the prompt tokens written before the image with a
    mask that keeps them from reading the image;
  * a batch whose rows carry different prompts == each row alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf

import prefixtune as pt
from prefixtune.attention import RowPrefixes, use_prefix
from prefixtune.methods import build, get_method, load_artifact, save_artifact
from prefixtune.vision import Image, ImageProcessor, evaluate_images

from conftest import SHARED, missing

SIZE, PATCH = 28, 7  # 16 patches


def tiny_image_model(kind: str, impl: str = "sdpa"):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=SIZE,
                  patch_size=PATCH)
    if kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**common, layerscale_value=0.5))
    else:
        model = tf.ViTModel(tf.ViTConfig(**common), add_pooling_layer=False)
    model.set_attn_implementation(impl)
    return model.eval().requires_grad_(False)


MODELS = [pytest.param(k, i, id=f"{k}-{i}") for k in ("dinov2", "vit") for i in ("sdpa", "eager")]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layers_of(model):
    return list(model.encoder.layer) if hasattr(model, "encoder") else list(model.layers)


def run_tokens(model, h, mask=None):
    """The model's own stack on a token sequence h (rows, tokens, hidden), then its final norm."""
    if hasattr(model, "encoder"):
        h = model.encoder(h, attention_mask=mask).last_hidden_state
    else:
        for layer in model.layers:
            h = layer(h, mask)
    return model.layernorm(h)


def pixels(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize("kind,impl", MODELS)
def test_shallow_prompts_from_patch_embeddings_equal_the_concatenated_tokens(kind, impl):
    model = tiny_image_model(kind, impl)
    vpt = build(model, "vpt-shallow", ImageProcessor(size=SIZE), length=5)
    x, other = pixels(2, 1), pixels(1, 2)
    with torch.no_grad():
        real = model.embeddings(other)[:, 1:6]                       # 5 real patch embeddings (with positions)
        vpt.prompts.copy_(real)
        emb = model.embeddings(x)
        ref = run_tokens(model, torch.cat([emb[:, :1], real.expand(2, -1, -1), emb[:, 1:]], 1))
        got = vpt.hidden(x)
        plain = model(pixel_values=x).last_hidden_state
    assert got.shape == (2, 1 + 5 + 16, 32)
    assert (got - ref).abs().max() <= 1e-5
    assert (got[:, 0] - plain[:, 0]).abs().max() > 1e-3, "prompts that change nothing would make this vacuous"
    vpt.detach()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, plain), "detach() leaves the model as it was"


@pytest.mark.parametrize("kind,impl", MODELS)
def test_deep_prompts_equal_a_layer_loop_replacing_the_prompt_slots(kind, impl):
    model = tiny_image_model(kind, impl)
    vpt = build(model, "vpt-deep", ImageProcessor(size=SIZE), length=4)
    x = pixels(2, 3)
    n_layers = len(layers_of(model))
    assert vpt.prompts.shape == (n_layers, 4, 32)
    with torch.no_grad():
        p = vpt.prompts
        emb = model.embeddings(x)
        h = torch.cat([emb[:, :1], p[0].expand(2, -1, -1), emb[:, 1:]], 1)
        for i, layer in enumerate(layers_of(model)):
            if i > 0:
                h = torch.cat([h[:, :1], p[i].expand(2, -1, -1), h[:, 5:]], 1)  # previous prompt outputs discarded
            h = layer(h, None)
        ref = model.layernorm(h)
        got = vpt.hidden(x)
        shallow = vpt.encoder.run(x, p[:1].unsqueeze(1)).last_hidden_state
    assert (got - ref).abs().max() <= 1e-5
    assert (got[:, 0] - shallow[:, 0]).abs().max() > 1e-3, "the deeper layers' prompts must matter"


@pytest.mark.parametrize("kind,impl", MODELS)
@pytest.mark.parametrize("layers", ["shallow", "deep"])
def test_batch_rows_with_different_prompts_equal_rows_alone(kind, impl, layers):
    model = tiny_image_model(kind, impl)
    vpt = build(model, "vpt-deep", ImageProcessor(size=SIZE), length=3)
    n = 1 if layers == "shallow" else len(layers_of(model))
    torch.manual_seed(5)
    prompts = torch.randn(n, 3, 3, 32)                                # a different prompt per row
    x = pixels(3, 4)
    with torch.no_grad():
        batch = vpt.encoder.run(x, prompts).last_hidden_state
        for r in range(3):
            alone = vpt.encoder.run(x[r:r + 1], prompts[:, r:r + 1]).last_hidden_state
            assert (batch[r] - alone[0]).abs().max() <= 1e-5, f"row {r}"
    assert (batch[0, 0] - batch[1, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind,impl", MODELS)
def test_key_value_prompts_equal_masked_prompt_tokens(kind, impl):
    """depth='prefix' (the engine's key/values at every layer): keys/values of tokens T, taken from T run
    alone, == T written before the image with T kept from reading the image (a 4-D additive mask)."""
    model = tiny_image_model(kind, impl)
    T = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(7))
    captured: dict = {}
    with torch.no_grad(), use_prefix(model, None, capture=captured):
        run_tokens(model, T)
    n_layers = len(layers_of(model))
    kv = torch.stack([torch.stack([captured[("self", i)][0][0], captured[("self", i)][1][0]]) for i in range(n_layers)])
    vpt = build(model, "vpt", ImageProcessor(size=SIZE), depth="prefix", length=4)
    assert vpt.prefix.shape == kv.shape
    x = pixels(2, 8)
    with torch.no_grad():
        vpt.prefix.copy_(kv)
        got = vpt.hidden(x)
        emb = model.embeddings(x)
        seq = 4 + emb.shape[1]
        allowed = torch.ones(seq, seq, dtype=torch.bool)
        allowed[:4, 4:] = False                                       # T does not read the image
        mask = torch.zeros(seq, seq).masked_fill(~allowed, torch.finfo(torch.float32).min).expand(2, 1, seq, seq)
        ref = run_tokens(model, torch.cat([T.expand(2, -1, -1), emb], 1), mask)[:, 4:]
        plain = model(pixel_values=x).last_hidden_state
    assert (got - ref).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-3


def test_linear_probe_cache_gives_the_uncached_logits():
    model = tiny_image_model("dinov2")
    probe = build(model, "vpt", ImageProcessor(size=SIZE), depth="none", pool="mean")
    x = pixels(3, 9)
    first = probe.image_logits(x)
    assert len(probe._cache.store) == 3
    again = probe.image_logits(x)
    probe._cache = None
    uncached = probe.image_logits(x)
    assert torch.equal(first, again) and (first - uncached).abs().max() <= 1e-6
    assert set(probe.trainable()) == {"head.weight", "head.bias"}


def test_baselines_full_and_lora_train_the_encoder_and_detach_restores_it():
    model = tiny_image_model("vit")
    x = pixels(2, 10)
    with torch.no_grad():
        before = model(pixel_values=x).last_hidden_state
    lora = build(model, "vpt", ImageProcessor(size=SIZE), depth="none", tune="lora", rank=2)
    names = set(lora.trainable())
    assert {n for n in names if n.startswith("lora.")} == {f"lora.layers.{i}.attention.{p}_proj.{ab}"
                                                           for i in range(3) for p in "qv" for ab in "AB"}
    with torch.no_grad():
        for n, p in lora.trainable().items():
            if n.endswith(".B"):
                p.normal_()
        assert (lora.hidden(x) - before).abs().max() > 1e-3
    lora.detach()
    adapter = build(model, "vpt", ImageProcessor(size=SIZE), depth="none", tune="adapter", size=4)
    sites = {n.rsplit(".", 2)[0] for n in adapter.trainable() if n.startswith("adapter.")}
    assert sites == {f"adapter.layers.{i}.{s}" for i in range(3) for s in ("attention.o_proj", "mlp")}
    with torch.no_grad():
        assert torch.equal(adapter.hidden(x), before), "adapters start as the identity (up = 0)"
        for n, p in adapter.trainable().items():
            if ".up." in n:
                p.normal_()
        assert (adapter.hidden(x) - before).abs().max() > 1e-3
    adapter.detach()
    full = build(model, "vpt", ImageProcessor(size=SIZE), depth="none", tune="full")
    assert sum(p.numel() for p in full.trainable().values()) == sum(p.numel() for p in model.parameters()) + 32 * 10 + 10
    loss = full.loss(full.collate([full.encode(None, np.zeros((8, 8, 3), np.uint8), "cat")], 0))
    loss.backward()
    opt = torch.optim.SGD(list(full.trainable().values()), lr=0.1)
    opt.step()
    with torch.no_grad():
        assert (model(pixel_values=x).last_hidden_state - before).abs().max() > 1e-4
    full.detach()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, before)


def random_images(n, seed, labels=("airplane", "cat")):
    rng = np.random.default_rng(seed)
    return [pt.data.Example(Image(f"r{seed}/{i}", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)),
                            labels[i % len(labels)]) for i in range(n)]


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_the_one_trainer_trains_saves_and_resumes_bit_identically(tmp_path, method):
    from prefixtune.train import TrainConfig, train

    class Killed(Exception):
        pass

    def kill_after(step):
        def progress(record):
            if record["step"] == step:
                raise Killed
        return progress

    def run(out, resume=False, progress=None):
        model = tiny_image_model("dinov2")
        torch.manual_seed(0)
        vpt = build(model, method, ImageProcessor(size=SIZE), length=2)
        cfg = TrainConfig(lr=1e-2, epochs=3, batch_size=4, max_steps=6, checkpoint_every=2, log_every=100)
        res = train(vpt, vpt.processor, random_images(12, 0), random_images(4, 1), cfg, out, resume=resume,
                    print_fn=lambda s: None, progress=progress)
        return vpt, res

    vpt, full = run(tmp_path / "a")
    assert full["steps"] == 6
    with pytest.raises(Killed):
        run(tmp_path / "b", progress=kill_after(5))                  # dies after step 5; checkpoint at step 4
    _, resumed = run(tmp_path / "b", resume=True)
    a = full["artifact"].tensors
    b = resumed["artifact"].tensors
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the saved file reloads onto the base model and classifies exactly as the artifact it holds
    model = tiny_image_model("dinov2")
    art = load_artifact(full["artifact_path"], model)
    loaded = get_method(method).from_artifact(model, art)
    items = random_images(6, 2)
    scores = evaluate_images(loaded, items)
    assert scores["n"] == 6 and set(scores["per_class"]) == set(loaded.config.labels)
    assert loaded.processor.size == SIZE


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_other_image_sizes_interpolate_the_position_table(kind):
    model = tiny_image_model(kind)
    vpt = build(model, "vpt-deep", ImageProcessor(size=SIZE), length=2, image_size=2 * SIZE)
    x = vpt.pixels([np.zeros((32, 32, 3), np.uint8)])
    assert x.shape[-1] == 56 and vpt.hidden(x).shape == (1, 1 + 2 + 64, 32)


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build(tiny_image_model("vit"), "vpt", ImageProcessor(size=SIZE), image_size=30)


def test_processor_resizes_and_normalizes_like_the_config_says():
    proc = ImageProcessor.from_config({"crop_size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5],
                                       "image_std": [0.25, 0.25, 0.25], "rescale_factor": 1 / 255}, size=14)
    img = np.full((32, 32, 3), 255, np.uint8)
    out = proc([img, np.zeros((32, 32, 3), np.uint8)])
    assert out.shape == (2, 3, 14, 14)
    assert torch.allclose(out[0], torch.full((3, 14, 14), 2.0)) and torch.allclose(out[1], torch.full((3, 14, 14), -2.0))


# -------------------------------------------------------------------------------------------
# the real assets (skipped with a reason where ../shared is absent, failed in CI)

CIFAR = SHARED / "data"
DINO = SHARED / "models" / "dinov2-small-offline"


def test_cifar10_vtab1k_split_is_seeded_disjoint_and_800_200():
    if not (CIFAR / "cifar10" / "train_500_per_class.npz").exists():
        missing(f"CIFAR-10 npz not found under {CIFAR}")
    from prefixtune.data import load_dataset

    tr = load_dataset("cifar10", "train", data_dir=CIFAR)
    dev = load_dataset("cifar10", "dev", data_dir=CIFAR)
    test = load_dataset("cifar10", "test", data_dir=CIFAR)
    assert (len(tr), len(dev), len(test)) == (800, 200, 5000)
    keys = {e.source.key for e in tr}
    assert not keys & {e.source.key for e in dev}
    assert keys == {e.source.key for e in load_dataset("cifar10", "train", data_dir=CIFAR)}
    assert keys != {e.source.key for e in load_dataset("cifar10", "train", data_dir=CIFAR, seed=1)}
    assert tr[0].source.pixels.shape == (32, 32, 3) and tr[0].target in tr.info["classes"]
    assert len(test.eval_items()) == 5000
    two = load_dataset("cifar10", "test", data_dir=CIFAR, classes=(0, 1))
    assert {e.target for e in two} == {"airplane", "automobile"} and len(two) == 1000


def test_load_model_dinov2_small_is_the_shared_encoder_with_its_processor():
    if not (DINO / "config.json").exists():
        missing(f"{DINO} not found")
    model, proc = pt.load_model("dinov2-small")
    assert type(model).__name__ == "Dinov2Model" and proc.size == 224 and proc.mean == (0.485, 0.456, 0.406)
    vpt = build(model, "vpt-deep", proc, length=2, image_size=56)
    x = vpt.pixels([np.zeros((32, 32, 3), np.uint8)])
    assert x.shape == (1, 3, 56, 56) and vpt.image_logits(x).shape == (1, 10)


def test_experiment_vpt_arms_train_pick_lr_on_val_and_tabulate(tmp_path):
    from prefixtune.experiments.vision import vpt as vx

    model = tiny_image_model("dinov2")
    proc = ImageProcessor(size=SIZE)
    labels = ("airplane", "cat")
    splits = {"train": random_images(8, 0, labels), "dev": random_images(4, 1, labels), "test": random_images(6, 2, labels)}
    sc = vx.VisionScale(image_size=SIZE, seeds=(0, 1), epochs=1, batch_size=4, n_test=6, bf16=False)
    rows = []
    for name in ("probe", "vpt-deep", "lora"):
        arm = vx.VPT_ARMS[name]
        arm = vx.Arm(arm.method, {**arm.options, "num_labels": 2, "labels": labels}, arm.lr)
        row = vx.train_arm(model, proc, name, arm, arm.grid[0], 0, splits, sc, tmp_path)
        assert row["steps"] == 2 and 0 <= row["val_accuracy"] <= 1 and "test_accuracy" not in row
        again = vx.train_arm(model, proc, name, arm, arm.grid[0], 0, splits, sc, tmp_path)
        assert again == row, "a finished run is read back, not redone"
        row = vx.test_arm(model, proc, row, splits, sc, tmp_path)      # the saved artifact, reloaded
        assert row["n_test"] == 6 and 0 <= row["test_accuracy"] <= 1
        assert vx.train_arm(model, proc, name, arm, arm.grid[0], 0, splits, sc, tmp_path) == row
        assert len(row["test_correct"]) == 6 and row["test_correct"].count("1") == round(6 * row["test_accuracy"])
        rows.append(dict(row, chosen=True))
    with torch.no_grad():  # every arm detached: the base model is untouched
        assert torch.equal(model(pixel_values=pixels(1, 0)).last_hidden_state,
                           tiny_image_model("dinov2")(pixel_values=pixels(1, 0)).last_hidden_state)
    table = vx.vpt_table(rows, sc, "tiny")
    assert "| vpt-deep |" in table and "| lora |" in table
    lora = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert "[" in lora.split("|")[7], lora  # a paired interval against vpt-deep (both have per-image results)


def test_experiment_vpt_end_to_end_chooses_on_dev_loss_and_compares_with_vpt_deep(tmp_path, monkeypatch):
    from prefixtune.data.cifar10 import CLASSES
    from prefixtune.experiments.vision import vpt as vx

    splits = {"train": random_images(10, 0, CLASSES), "dev": random_images(10, 1, CLASSES),
              "test": random_images(10, 2, CLASSES)}
    monkeypatch.setattr(vx, "vision_splits", lambda data_dir, n_test, seed=0: splits)
    monkeypatch.setitem(vx.VISION_SCALES, "tiny", vx.VisionScale(image_size=SIZE, seeds=(0, 1), epochs=1, batch_size=5,
                                                                 n_test=10, bf16=False))
    model, proc = tiny_image_model("dinov2"), ImageProcessor(size=SIZE)
    result = vx.run_vpt_experiment(tmp_path, scale="tiny", arms=["probe", "vpt-deep"], print_fn=lambda s: None,
                                   model_and_processor=(model, proc))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    for arm in ("probe", "vpt-deep"):
        grid = [r for r in rows if r["arm"] == arm and r["seed"] == 0]
        assert len(grid) >= 3 and all(r["best_dev_loss"] is not None for r in grid)
        best = min(grid, key=lambda r: (r["best_dev_loss"], r["lr"]))
        assert result["chosen"][arm] == best["lr"] and [r["lr"] for r in grid if r["chosen"]] == [best["lr"]]
        assert [r["seed"] for r in rows if r["arm"] == arm and r["chosen"]] == [0, 1]
    probe = next(line for line in result["table"].splitlines() if line.startswith("| probe |"))
    assert "vs vpt-deep" in result["table"] and "[" in probe.split("|")[7], probe


def test_an_arms_learning_rate_grid_grows_past_the_winning_edge_twice_at_most(tmp_path, monkeypatch):
    from prefixtune.experiments.vision import vpt as vx

    trained = []

    def fake_train_arm(model, proc, name, arm, lr, seed, splits, sc, out, print_fn=print):
        trained.append(lr)  # dev loss falls with the rate: the high edge always wins
        return {"arm": name, "lr": lr, "seed": seed, "best_dev_loss": 1.0 / lr, "val_accuracy": 0.5}

    monkeypatch.setattr(vx, "train_arm", fake_train_arm)
    sc = vx.VisionScale(seeds=(0, 1))
    arm = vx.Arm("vpt", {}, 1e-3)
    rows = vx.select_arm_lr(None, None, "probe", arm, {}, sc, tmp_path, print_fn=lambda s: None)
    assert sorted({r["lr"] for r in rows}) == [0.000316, 0.001, 0.00316, 0.01, 0.0316]  # 3 points + 2 extensions
    assert {(r["chosen_lr"], r["at_edge"]) for r in rows} == {(0.0316, "high")}
    # a middle optimum is chosen without growing the grid
    monkeypatch.setattr(vx, "train_arm", lambda *a, **k: dict(fake_train_arm(*a, **k), best_dev_loss=abs(a[4] - 1e-3)))
    rows = vx.select_arm_lr(None, None, "probe", arm, {}, sc, tmp_path, print_fn=lambda s: None)
    assert [r["lr"] for r in rows] == [0.000316, 0.001, 0.00316] and rows[0]["chosen_lr"] == 0.001


def test_a_run_written_before_dev_losses_were_recorded_reads_its_log(tmp_path):
    from prefixtune.experiments.vision import vpt as vx

    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 25, "dev_loss": 2.5}\n{"step": 50, "dev_loss": 2.25}\n')
    assert vx.dev_loss_of({"val_accuracy": 0.5}, tmp_path) == 2.25
    assert vx.dev_loss_of({"best_dev_loss": 1.5}, tmp_path) == 1.5
    assert vx.dev_loss_of({}, tmp_path / "nowhere") == float("inf")


def test_the_paired_accuracy_difference_resamples_the_same_images_for_both_arms():
    from prefixtune.experiments.vision import common as vx

    ref = {"arm": "vpt-deep", "chosen": True}
    rows = [dict(ref, seed=0, test_correct="1100" * 50), dict(ref, seed=1, test_correct="1010" * 50),
            {"arm": "lora", "chosen": True, "seed": 0, "test_correct": "1110" * 50},
            {"arm": "lora", "chosen": True, "seed": 1, "test_correct": "1011" * 50},
            {"arm": "old", "chosen": True, "seed": 0}]  # no per-image results: no interval
    diff = vx.paired_accuracy_difference(rows, "lora", "vpt-deep")
    assert diff.estimate == pytest.approx(0.25) and 0 < diff.low <= 0.25 <= diff.high and diff.verdict() == "ahead"
    assert vx.paired_accuracy_difference(rows, "old", "vpt-deep") is None
    assert vx.paired_accuracy_difference(rows, "vpt-deep", "vpt-deep") is None


# -------------------------------------------------------------------------------------------
# L2P


def test_l2p_picks_the_nearest_keys_per_row_and_classifies_the_mean_prompt_output():
    model = tiny_image_model("dinov2")
    l2p = build(model, "l2p", ImageProcessor(size=SIZE), pool_size=6, top_n=2, length=3)
    x = pixels(3, 11)
    with torch.no_grad():
        q = model(pixel_values=x).last_hidden_state[:, 0]                   # the frozen [CLS] query
        l2p.keys.copy_(torch.randn(6, 32))
        l2p.keys[4] = q[0] * 3                                              # row 0's nearest key is 4
        logits = l2p.image_logits(x)
        cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(l2p.keys, dim=-1).T
        for r in range(3):
            chosen = cos[r].topk(2).indices
            if r == 0:
                assert int(chosen[0]) == 4
            prompts = l2p.prompts[chosen].reshape(1, 6, 32)
            h = model.embeddings(x[r:r + 1])
            ref_h = run_tokens(model, torch.cat([h[:, :1], prompts, h[:, 1:]], 1))
            ref = l2p.head(ref_h[:, 1:7].mean(1))
            assert (logits[r] - ref[0]).abs().max() <= 1e-5, f"row {r}"
        distance = (1 - cos.topk(2, dim=-1).values).sum(-1)
        assert torch.allclose(l2p._last_distance, distance, atol=1e-6)
    # loss = CE over the current task's classes + lambda * distance
    l2p.task_classes = [2, 3]
    batch = l2p.collate([l2p.encode(None, np.zeros((8, 8, 3), np.uint8), "bird")], 0)
    loss = l2p.loss(batch)
    lg = l2p.image_logits(batch.input_ids)[0]
    want = -torch.log_softmax(lg[[2, 3]], -1)[0] + 0.1 * l2p._last_distance[0]
    assert abs(loss.item() - want.item()) <= 1e-5


def test_l2p_training_pulls_the_chosen_keys_towards_their_queries(tmp_path):
    from prefixtune.train import TrainConfig, train

    model = tiny_image_model("vit")
    torch.manual_seed(0)
    l2p = build(model, "l2p", ImageProcessor(size=SIZE), pool_size=4, top_n=1, length=2, pull=1.0,
                num_labels=2, labels=("airplane", "cat"))
    items = random_images(8, 3)
    x = l2p.pixels([e.source for e in items])
    with torch.no_grad():
        l2p.image_logits(x)
        before = float(l2p._last_distance.mean())
    train(l2p, l2p.processor, items, [], TrainConfig(lr=5e-2, epochs=5, batch_size=4, log_every=100), tmp_path,
          print_fn=lambda s: None)
    with torch.no_grad():
        l2p.image_logits(x)
        assert float(l2p._last_distance.mean()) < before - 0.05


def test_continual_scores_average_accuracy_and_forgetting():
    from prefixtune.experiments.vision.l2p import continual_scores

    acc = [[0.9], [0.5, 0.8], [0.3, 0.6, 0.7]]      # acc[t][j]: task j after training task t
    s = continual_scores(acc)
    assert s["average_accuracy"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)


def test_experiment_l2p_chooses_each_arms_rate_on_held_out_images_and_compares_with_l2p(tmp_path, monkeypatch):
    """`experiment l2p` under the protocol: every arm's grid (seed 0) scored by the validation images' loss after
    the last task, the lowest chosen, the other seeds at that rate, a paired interval against L2P."""
    from prefixtune.data.cifar10 import CLASSES
    from prefixtune.experiments.vision import l2p as vx

    seen_splits = []

    def splits(data_dir, sc, seed=0):
        seen_splits.append(seed)
        return {"train": random_images(20, seed, CLASSES), "val": random_images(10, 50 + seed, CLASSES),
                "test": random_images(20, 99, CLASSES)}

    monkeypatch.setattr(vx, "l2p_splits", splits)
    monkeypatch.setitem(vx.L2P_ARMS, "l2p", vx.L2PArm("l2p", {"pool_size": 4, "top_n": 2, "length": 2}, True))
    sc = vx.L2PScale(image_size=SIZE, per_class=2, val_per_class=1, epochs=1, batch_size=4, test_per_class=2,
                     seeds=(0, 1), bf16=False)
    monkeypatch.setitem(vx.L2P_SCALES, "tiny", sc)
    model, proc = tiny_image_model("dinov2"), ImageProcessor(size=SIZE)
    result = vx.run_l2p_experiment(tmp_path, scale="tiny", arms=["seq-head", "l2p"], print_fn=lambda s: None,
                                   model_and_processor=(model, proc))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(set(seen_splits)) == [0, 1]
    for arm in ("seq-head", "l2p"):
        grid = [r for r in rows if r["arm"] == arm and r["seed"] == 0]
        assert len(grid) >= 3 and len({r["lr"] for r in grid}) == len(grid)
        best = min(grid, key=lambda r: (r["val_loss"], r["lr"]))
        assert result["chosen"][arm] == best["lr"] and [r["lr"] for r in grid if r["chosen"]] == [best["lr"]]
        assert [r["seed"] for r in rows if r["arm"] == arm and r["chosen"]] == [0, 1]
        assert all(len(r["test_correct"]) == 20 and 0 <= r["val_accuracy"] <= 1 for r in rows if r["arm"] == arm)
    seq = next(line for line in result["table"].splitlines() if line.startswith("| seq-head |"))
    assert "vs l2p" in result["table"] and "[" in seq.split("|")[8], seq
    again = vx.run_l2p_experiment(tmp_path, scale="tiny", arms=["seq-head", "l2p"], print_fn=lambda s: None,
                                  model_and_processor=(model, proc))
    assert again["rows"] == result["rows"]  # finished runs are read back, not retrained


def test_evaluate_images_reports_the_cross_entropy_over_all_classes():
    model = tiny_image_model("vit")
    method = build(model, "vpt", ImageProcessor(size=SIZE), depth="none", num_labels=2, labels=("airplane", "cat"))
    items = random_images(6, 4)
    res = evaluate_images(method, items)
    logits = pt.vision.predict_images(method, [e.source for e in items])
    gold = torch.tensor([("airplane", "cat").index(e.target) for e in items])
    assert res["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, gold)), rel=1e-6)
