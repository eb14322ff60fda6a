"""Prefix files: round trips, metadata, refusals (nothing overwritten), PEFT import/export."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import prefixtune as pt
from prefixtune.engine import forward_with_prefix
from prefixtune.attention import RowPrefixes
from prefixtune.peft_io import to_peft_model

from conftest import tiny
from test_engine import random_prefix


def logits_with(model, prefix, **kw):
    x = torch.tensor([[3, 14, 15, 92]])
    return forward_with_prefix(model, RowPrefixes.per_row([prefix]), input_ids=x, **kw).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_save_load_round_trip_identical_logits(arch, tmp_path):
    model = tiny(arch)
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=4, reparam="mlp", mlp_hidden=16))
    path = tmp_path / "p.safetensors"
    pm.save(path)
    loaded = pt.load_prefix(path, model)
    kw = {"decoder_input_ids": torch.tensor([[0, 5]])} if model.config.is_encoder_decoder else {}
    x = torch.tensor([[3, 14, 15, 92]])
    assert torch.equal(pm(input_ids=x, **kw).logits, logits_with(model, loaded, **kw))
    meta = loaded.meta
    assert meta["method"] == "prefix" and meta["length"] == 4 and meta["fingerprint"] == pt.models.fingerprint(model)
    assert meta["library_version"] == pt.__version__ and "base_model" in meta
    assert set(meta["shapes"]) == set(pt.layout_of(model).shapes)
    # only merged tensors are stored: no MLP weights
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("prefix.") for k in f.keys())


def test_prefix_is_a_tenth_of_a_percent_scale(tmp_path):
    model = tiny("llama")
    prefix = pt.PrefixModel(model, pt.PrefixConfig(length=10)).merge()
    assert prefix.num_values() == 2 * 2 * 2 * 10 * 8  # layers * (k,v) * kv_heads * length * head_dim


def test_wrong_base_model_is_refused(tmp_path):
    model = tiny("llama")
    path = tmp_path / "p.safetensors"
    pt.PrefixModel(model, pt.PrefixConfig(length=3)).save(path)
    other = tiny("llama")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # same shapes, different weights
    with pytest.raises(pt.PrefixFileError, match=r"p\.safetensors.*fingerprint"):
        pt.load_prefix(path, other)


def test_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    pt.PrefixModel(tiny("llama"), pt.PrefixConfig(length=3)).save(path)
    with pytest.raises(pt.PrefixFileError, match=r"p\.safetensors.*'self'"):
        pt.load_prefix(path, tiny("t5"))
    with pytest.raises(pt.PrefixFileError, match="needs"):
        pt.load_prefix(path, tiny("gpt2"), check_fingerprint=False)


def test_truncated_and_garbage_files_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    pt.PrefixModel(tiny("llama"), pt.PrefixConfig(length=3)).save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(pt.PrefixFileError, match=r"cut\.safetensors.*(truncated|damaged)"):
        pt.load_prefix(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, this is not a tensor file at all")
    with pytest.raises(pt.PrefixFileError, match=r"junk\.safetensors"):
        pt.load_prefix(junk)
    with pytest.raises(pt.PrefixFileError, match="no such file"):
        pt.load_prefix(tmp_path / "missing.safetensors")


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(pt.PrefixFileError, match="pickle"):
        pt.load_prefix(pkl)
    ts = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, ts)
    with pytest.raises(pt.PrefixFileError, match="pickle"):
        pt.load_prefix(ts)


def test_save_is_atomic_and_failed_save_keeps_old_file(tmp_path, monkeypatch):
    model = tiny("llama")
    path = tmp_path / "p.safetensors"
    pt.PrefixModel(model, pt.PrefixConfig(length=3)).save(path)
    before = path.read_bytes()
    import prefixtune.prefix as prefix_module

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(prefix_module.os, "replace", failing_replace)
    with pytest.raises(OSError):
        pt.PrefixModel(model, pt.PrefixConfig(length=5)).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left behind


def test_nan_prefix_is_refused(tmp_path):
    model = tiny("llama")
    prefix = random_prefix(model, 2, seed=0)
    good = pt.save_prefix(prefix, tmp_path / "good.safetensors", model=model)
    prefix.kv["self"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(pt.PrefixFileError, match="NaN"):  # never written ...
        pt.save_prefix(prefix, tmp_path / "nan.safetensors", model=model)
    assert not (tmp_path / "nan.safetensors").exists()
    # ... and a NaN file made by other means is refused on load
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    save_file({"prefix.self": prefix.kv["self"].contiguous()}, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(pt.PrefixFileError, match="NaN"):
        pt.load_prefix(tmp_path / "nan.safetensors", model)


def test_peft_export_gives_equal_logits_in_peft(tmp_path):
    model = tiny("llama")
    prefix = random_prefix(model, 3, seed=1)
    ours = logits_with(model, prefix)
    pt.export_peft(prefix, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny("llama"), tmp_path / "adapter")
    theirs = peft_model(input_ids=torch.tensor([[3, 14, 15, 92]])).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_peft_import_round_trip(tmp_path):
    model = tiny("llama")
    peft_model = to_peft_model(random_prefix(model, 4, seed=2), tiny("llama"))
    peft_model.save_pretrained(tmp_path / "adapter")  # written by PEFT itself
    imported = pt.import_peft(tmp_path / "adapter", model)
    theirs = peft_model(input_ids=torch.tensor([[3, 14, 15, 92]])).logits
    assert (logits_with(model, imported) - theirs).abs().max() <= 1e-4


def test_peft_export_refuses_encoder_decoder_prefixes(tmp_path):
    prefix = random_prefix(tiny("t5"), 2, seed=3)
    with pytest.raises(ValueError, match="encoder"):
        pt.export_peft(prefix, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_safetensors_file_whose_header_length_starts_like_a_pickle_loads(tmp_path):
    """A header length with low byte 0x80 (1 file in 256) once read as pickle protocol magic."""
    from safetensors.torch import save

    for pad in range(300):  # grow the metadata until the header length's low byte is 0x80
        data = save({"x": torch.zeros(1)}, metadata={"pad": "p" * pad})
        if data[0] == 0x80:
            break
    path = tmp_path / "odd.safetensors"
    path.write_bytes(data)
    tensors, meta = pt.prefix.read_safetensors(path)
    assert meta["pad"] == "p" * pad and torch.equal(tensors["x"], torch.zeros(1))
    assert data[0] == 0x80 and pt.prefix.read_metadata(path)["pad"] == "p" * pad
