"""The trainer: loss on targets only, only the prefix changes, exact resume after kill -9, NaN stop,
decoding against a reference loop, and the CLI end to end on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import prefixtune as pt
from prefixtune.batching import collate, encode
from prefixtune.decode import DecodeConfig, generate_texts
from prefixtune.engine import forward_with_prefix, target_loss
from prefixtune.attention import RowPrefixes
from prefixtune.train import TrainConfig, TrainingError, train

from conftest import reversal_pairs, tiny, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_target_loss_equals_full_logits_loss(arch):
    model, tok = tiny(arch), tiny_tokenizer(arch)
    is_ed = model.config.is_encoder_decoder
    pairs = reversal_pairs(3)
    batch = collate([encode(tok, p.source, p.target, is_ed) for p in pairs], tok.pad_token_id, is_ed)
    rows = RowPrefixes.per_row([pt.PrefixModel(model, pt.PrefixConfig(length=3)).merge()])
    got = target_loss(model, rows, batch.input_ids, batch.attention_mask, batch.labels)
    kw = {"labels": batch.labels} if is_ed else {}
    logits = forward_with_prefix(model, rows, input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw).logits
    if is_ed:
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
    else:  # reference: every position's logits, shifted, ignoring non-targets
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                                                ignore_index=-100)
    assert abs(got.item() - ref.item()) < 1e-5
    if not is_ed:  # the prompt part is not trained on
        assert (batch.labels[0, : len(tok(pairs[0].source)["input_ids"])] == -100).all()


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_target_loss_gives_the_full_logits_loss_and_gradients(chunk, monkeypatch):
    """The LM head + cross-entropy run LOSS_CHUNK targets at a time: same loss, same prefix gradients
    as every position's logits at once (chunk 1 and 3 split the targets, 1000 does not)."""
    from prefixtune import engine as engine_module

    monkeypatch.setattr(engine_module, "LOSS_CHUNK", chunk)
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    batch = collate([encode(tok, p.source, p.target, False) for p in reversal_pairs(4)], tok.pad_token_id, False)
    assert (batch.labels[:, 1:] != -100).sum() > 3  # more targets than a chunk of 3
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=3))

    def loss_and_grads(fn):
        pm.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), {k: v.grad.clone() for k, v in pt.trainable_state(pm).items()}

    got, got_grads = loss_and_grads(lambda: target_loss(model, pm.rows(), batch.input_ids, batch.attention_mask,
                                                        batch.labels))
    logits = lambda: forward_with_prefix(model, pm.rows(), input_ids=batch.input_ids,  # noqa: E731
                                         attention_mask=batch.attention_mask).logits
    ref, ref_grads = loss_and_grads(lambda: torch.nn.functional.cross_entropy(
        logits()[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100))
    assert abs(got - ref) < 1e-5
    assert all(torch.allclose(got_grads[k], ref_grads[k], atol=1e-6, rtol=1e-4) for k in ref_grads)


def test_training_learns_and_changes_only_the_prefix(tmp_path):
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=4, mlp_hidden=32))
    result = train(pm, tok, reversal_pairs(60), reversal_pairs(20, seed=1),
                   TrainConfig(lr=3e-2, epochs=4, batch_size=6, log_every=100), tmp_path, print_fn=lambda s: None)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    dev = [r["dev_loss"] for r in log if "dev_loss" in r]
    # a tiny random model is nearly uniform and learns little; the real-model test checks a large drop
    assert dev == sorted(dev, reverse=True) and dev[-1] < dev[0] - 0.01, dev
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    loaded = pt.load_prefix(result["artifact_path"], model)
    assert loaded.meta["train"]["lr"] == 3e-2 and loaded.meta["method"] == "prefix"


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=2, reparam="flat"))
    import prefixtune.methods.base as engine_module

    real = engine_module.target_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(engine_module, "target_loss", flaky)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 .*checkpoint\.safetensors"):
        train(pm, tok, reversal_pairs(40), [], TrainConfig(lr=1e-3, epochs=1, batch_size=4, checkpoint_every=2),
              tmp_path, print_fn=lambda s: None)
    tensors, meta = pt.prefix.read_safetensors(tmp_path / "checkpoint.safetensors")
    assert json.loads(meta["state"])["step"] == 4
    assert all(torch.isfinite(t.float()).all() for k, t in tensors.items() if k.startswith("param."))


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    model, tok = tiny("llama"), tiny_tokenizer("llama")
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=4)
    train(pt.PrefixModel(model, pt.PrefixConfig(length=2)), tok, reversal_pairs(8), [], cfg, tmp_path, print_fn=lambda s: None)
    with pytest.raises(TrainingError, match="--resume"):
        train(pt.PrefixModel(model, pt.PrefixConfig(length=2)), tok, reversal_pairs(8), [], cfg, tmp_path,
              print_fn=lambda s: None)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_decoding_equals_reference_loop(arch):
    """generate_texts (batched, left-padded, beam 1) equals a one-by-one no-cache greedy loop."""
    model, tok = tiny(arch), tiny_tokenizer(arch)
    prefix = pt.PrefixModel(model, pt.PrefixConfig(length=3, init_std=0.5)).merge()
    sources = ["w5 w6 w7", "w8", "w9 w10 w11 w12 w13"]
    got = generate_texts(model, tok, sources, prefix, DecodeConfig(num_beams=1, max_new_tokens=6, batch_size=2))
    from prefixtune.batching import prompt_ids
    from prefixtune.decode import _stop_ids

    stops = _stop_ids(tok, True)
    for source, out in zip(sources, got):
        ids = prompt_ids(tok, source, model.config.is_encoder_decoder, 512)
        new = []
        for _ in range(6):
            if model.config.is_encoder_decoder:
                logits = forward_with_prefix(model, RowPrefixes.per_row([prefix]), input_ids=torch.tensor([ids]),
                                             decoder_input_ids=torch.tensor([[0] + new]), use_cache=False).logits
            else:
                logits = forward_with_prefix(model, RowPrefixes.per_row([prefix]), input_ids=torch.tensor([ids + new]),
                                             use_cache=False).logits
            tok_id = int(logits[0, -1].argmax())
            if tok_id in stops:
                break
            new.append(tok_id)
        assert out == tok.decode(new, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------
# The CLI end to end, and resume after kill -9


def _tiny_assets(tmp_path: Path) -> tuple[Path, Path]:
    model_dir = tmp_path / "tiny-llama"
    tiny("llama").save_pretrained(model_dir)
    tiny_tokenizer("llama").save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in reversal_pairs(120)))
    return model_dir, data


def _cli(*args, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "prefixtune.cli", *map(str, args)], env


def _train_args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--dataset", "jsonl", "--path", data, "--train-split", "all",
            "--eval-split", "all", "--train-size", 80, "--out", out, "--lr", "0.01", "--epochs", 3,
            "--batch-size", 4, "--prefix-length", 3, "--mlp-hidden", 16, "--checkpoint-every", 3, *extra]


def test_cli_train_evaluate_generate_score(tmp_path):
    model_dir, data = _tiny_assets(tmp_path)
    cmd, env = _cli(*_train_args(model_dir, data, tmp_path / "run"))
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    prefix = tmp_path / "run" / "prefix.safetensors"
    assert prefix.exists()
    cmd, env = _cli("evaluate", "--prefix", prefix, "--dataset", "jsonl", "--path", data, "--split", "all",
                    "--out", tmp_path / "eval", "--num-beams", 2, "--max-new-tokens", 6)
    r = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "generic" and metrics["n"] > 0 and "bleu" in metrics["scores"]
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    trained_sources = set()  # evaluation must exclude the sources that were trained on
    from prefixtune.data import load_dataset, low_data_split
    trained_sources = {e.source for e in low_data_split(load_dataset(str(data)), 80, seed=0)[0].examples}
    assert preds and not trained_sources & {p["source"] for p in preds}
    assert "bleu" in r.stdout.lower()
    cmd, env = _cli("generate", "--prefix", prefix, "--input", "w5 w6", "--input", "w7 w8 w9", "--num-beams", 1,
                    "--max-new-tokens", 5)
    r = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    assert len(r.stdout.strip().splitlines()) == 2
    (tmp_path / "hyp.txt").write_text("the cat sat on the mat\na dog runs in the park\n")
    (tmp_path / "refs.txt").write_text("the cat sat on the mat\nthe cat sits\n\na dog runs in a park\n")
    cmd, env = _cli("score", "--task", "generic", "--hyp", tmp_path / "hyp.txt", "--refs", tmp_path / "refs.txt", "--json")
    r = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    assert 0 < json.loads(r.stdout)["bleu"] <= 1


def test_kill_9_and_resume_gives_the_same_prefix(tmp_path):
    model_dir, data = _tiny_assets(tmp_path)
    # uninterrupted reference run
    cmd, env = _cli(*_train_args(model_dir, data, tmp_path / "full"))
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    # a run killed with SIGKILL after its second checkpoint, then resumed
    cmd, env = _cli(*_train_args(model_dir, data, tmp_path / "killed"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if log.exists() and sum(1 for line in log.read_text().splitlines() if '"loss"' in line) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "prefix.safetensors").exists(), "run finished before it could be killed"
    cmd, env = _cli(*_train_args(model_dir, data, tmp_path / "killed", "--resume"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    a = pt.load_prefix(tmp_path / "full" / "prefix.safetensors").kv
    b = pt.load_prefix(tmp_path / "killed" / "prefix.safetensors").kv
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_data_parallel_training(tmp_path):
    """The same loop under torchrun/accelerate with 2 CPU processes (gloo): batches split, gradients averaged."""
    model_dir, data = _tiny_assets(tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prefixtune.cli",
           *map(str, _train_args(model_dir, data, tmp_path / "ddp"))]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 processes" in r.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 3 * (20 // 2)  # 3 epochs, 20 batches / 2 processes
    assert (tmp_path / "ddp" / "prefix.safetensors").exists()


def test_cli_user_errors_are_one_clear_line(tmp_path):
    cmd, env = _cli("train", "--dataset", "e2e", "--out", tmp_path / "x", "--lr", "-1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --lr: TrainConfig.lr: must be > 0, got -1.0"


def test_download_failure_names_url_and_way_around(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from prefixtune.data.fetch import DownloadError, urllib_fetch

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError, match=r"https://example\.org/x\.csv.*--data-dir"):
        urllib_fetch("https://example.org/x.csv", tmp_path / "x.csv")


def test_a_failed_download_says_first_what_the_data_folder_lacks(tmp_path):
    from prefixtune.data import load_dataset
    from prefixtune.data.fetch import DownloadError

    def offline(url, dest):
        raise DownloadError(f"could not download {url} (offline)")

    with pytest.raises(DownloadError) as raised:
        load_dataset("e2e", "dev", data_dir=tmp_path / "mistyped", download=True, fetch=offline)
    message = str(raised.value)
    # the folder looked in comes first (a mistyped --data-dir is the likelier mistake), then the download's failure
    assert message.index(str(tmp_path / "mistyped" / "e2e")) < message.index("could not download")
    assert message.startswith("e2e split 'dev' not found")
    assert not (tmp_path / "mistyped" / "e2e" / "devset.csv").exists()  # nothing half-written
