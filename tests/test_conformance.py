"""One conformance suite over the method registry: a method is tested by registering it.

For every registered method, on a tiny model of each architecture kind it accepts (decoder-only
with grouped-query attention, GPT-2's fused Conv1D attention, T5 encoder-decoder; BERT for text
classifiers; DINOv2 and ViT for image classifiers; CLIP for methods that prompt its text tower), through
the one trainer:
  * it trains: the declared tensors change, and nothing else of the base model does (soft methods and
    adapters) or the base is restored bit for bit by `detach()` (weight methods);
  * the saved file loads on a fresh copy of the base and behaves exactly as the artifact in memory
    (the same generated text, or the same classifier loss), and is refused on another base model;
  * a run killed after its checkpoint and resumed gives a bit-identical artifact;
  * every field of its config is a `prefixtune train` option.
A refusal to build on an architecture must say why; every method must build on at least one.
"""

from __future__ import annotations

import re

import pytest
import torch

import prefixtune as pt
from prefixtune.methods import METHODS, attach, build, load_artifact
from prefixtune.train import TrainConfig, train

from conftest import one_torch_thread_impl, reversal_pairs, tiny, tiny_tokenizer
from test_ptuning_v2 import contains_pairs, encoder_tokenizer, tiny_encoder
from test_vision import SIZE, random_images, tiny_image_model
from test_vision_clip import WORDS, processor as clip_processor, tiny_clip
from prefixtune.vision import ImageProcessor
from prefixtune.data.cifar10 import CLASSES as CIFAR10

one_torch_thread = pytest.fixture(autouse=True)(one_torch_thread_impl)

# the tiny models a method of each kind is tried on: (factory, tokenizer or image processor, training data)
GENERATION_ARCHS = {a: (lambda a=a: tiny(a), lambda a=a: tiny_tokenizer(a), reversal_pairs) for a in ("llama", "gpt2", "t5")}
CLASSIFIER_ARCHS = {"bert": (lambda: tiny_encoder("bert"), lambda: encoder_tokenizer("bert"), contains_pairs)}
IMAGE_ARCHS = {k: (lambda k=k: tiny_image_model(k), lambda: ImageProcessor(size=SIZE),
                   lambda n, seed=0: random_images(n, seed)) for k in ("dinov2", "vit")}

# CLIP with a word tokenizer that knows the methods' default class names (CIFAR-10's); <eos> stays last
CLIP_WORDS = tuple(WORDS[:-1]) + tuple(c for c in CIFAR10 if c not in WORDS) + (WORDS[-1],)


def clip_images(domains: bool):
    """Labelled images for CLIP methods; with `domains`, targets are 'domain/class' and 'domain/?' unlabelled."""
    labels = ("source/airplane", "target/cat", "target/?") if domains else ("airplane", "cat")
    return lambda n, seed=0: random_images(n, seed, labels)


def archs_for(cls) -> dict:
    if cls.modality == "image-text":
        domains = "domains" in cls.config_class.__dataclass_fields__
        return {"clip": (lambda: tiny_clip(vocab=len(CLIP_WORDS), positions=48), lambda: clip_processor(CLIP_WORDS),
                         clip_images(domains))}
    if cls.modality == "image":
        return IMAGE_ARCHS
    return GENERATION_ARCHS if cls.generates else CLASSIFIER_ARCHS


TEXT = dict(METHODS)
assert {cls.modality for cls in TEXT.values()} <= {"text", "image", "image-text"}  # a new modality needs its archs
CASES = [pytest.param(n, a, id=f"{n}-{a}") for n, cls in TEXT.items() for a in archs_for(cls)]


def _setup(name: str, arch: str):
    make_model, make_tok, data = archs_for(TEXT[name])[arch]
    return make_model, make_tok(), data


def _build(name, model, tok):
    torch.manual_seed(0)
    try:
        return build(model, name, tok)
    except ValueError as e:  # a method may refuse an architecture, but must say why
        assert len(str(e)) > 40 and (name in str(e) or type(model).__name__ in str(e) or "model" in str(e)), e
        pytest.skip(f"{name} refuses {type(model).__name__}: {e}")


class Killed(Exception):
    pass


def _train(method, tok, data, out, resume=False, kill_after=None):
    def progress(record):
        if record["step"] == kill_after:
            raise Killed

    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, max_steps=5, checkpoint_every=2, log_every=100,
                      max_source_len=64)
    return train(method, tok, data(16), data(4, seed=1), cfg, out, resume=resume, print_fn=lambda s: None,
                 progress=progress)


def _behaviour(model, tok, artifact, name, data):
    """What the artifact does to the model: generated texts (generation) or the dev loss (classifiers)."""
    if TEXT[name].generates:
        from prefixtune.decode import DecodeConfig, generate_texts

        cfg = DecodeConfig(num_beams=1, max_new_tokens=5, batch_size=2)
        return generate_texts(model, tok, ["w5 w6 w7", "w8 w9", "w10"], artifact, cfg)
    with artifact.apply(model, tok) as method, torch.no_grad():  # the artifact protocol: applied, then removed
        batch = method.collate([method.encode(tok, d.source, d.target, 64, 8) for d in data(4, seed=3)],
                               tok.pad_token_id)
        return method.loss(batch)


@pytest.mark.parametrize("name,arch", CASES)
def test_method_conforms(name, arch, tmp_path):
    make_model, tok, data = _setup(name, arch)
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    method = _build(name, model, tok)
    cls = TEXT[name]
    assert method.kind in ("soft", "weight", "classifier") and method.kind == cls.kind
    assert cls.servable <= cls.mixable  # the server batches any mix of prefixes: only mixable ones are served
    before = {k: v.detach().clone() for k, v in method.trainable().items()}
    assert before and method.num_trainable() == sum(v.numel() for v in before.values())

    result = _train(method, tok, data, tmp_path / "full")
    assert result["steps"] == 5
    trained = {k: v.detach().clone() for k, v in method.trainable().items()}
    assert any(not torch.equal(trained[k], before[k]) for k in before), "nothing trained"
    changed_base = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    if cls.kind == "weight":
        method.detach()  # weight methods change the model itself: detach() gives the base back exactly
    else:
        assert not changed_base, f"{name} changed base weights {sorted(changed_base)[:3]}"
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())

    # the file on a fresh copy of the base behaves exactly as the artifact in memory
    path = result["artifact_path"]
    fresh = make_model()
    loaded = load_artifact(path, fresh)
    want = _behaviour(make_model(), tok, result["artifact"], name, data)
    got = _behaviour(fresh, tok, loaded, name, data)
    assert got == want if isinstance(want, list) else torch.equal(got, want)
    assert all(torch.equal(v, base[k]) for k, v in fresh.state_dict().items())  # and leaves it as it was
    assert loaded.mixable == cls.mixable and loaded.method == name

    # another base model is refused, naming the fingerprint
    other = make_model()
    with torch.no_grad():
        next(p for p in other.parameters() if p.dim() == 2)[0, 0] += 1.0
    with pytest.raises(pt.PrefixFileError, match="fingerprint"):
        load_artifact(path, other)

    # killed after the step-4 checkpoint and resumed: the identical artifact
    again = make_model()
    with pytest.raises(Killed):
        _train(_build(name, again, tok), tok, data, tmp_path / "killed", kill_after=5)
    resumed_model = make_model()
    resumed = _train(_build(name, resumed_model, tok), tok, data, tmp_path / "killed", resume=True)
    a, b = load_artifact(path), load_artifact(resumed["artifact_path"])
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("name", list(TEXT))
def test_every_method_builds_on_some_architecture(name):
    archs = archs_for(TEXT[name])
    built = []
    for arch, (make_model, make_tok, _) in archs.items():
        try:
            build(make_model(), name, make_tok())
            built.append(arch)
        except ValueError:
            pass
    assert built, f"{name} builds on none of {list(archs)}"


def test_every_config_field_is_a_train_option():
    from typer.testing import CliRunner

    from prefixtune.cli import app

    text = CliRunner().invoke(app, ["train", "--help"], terminal_width=400, env={"COLUMNS": "400"}).output
    flags = set(re.findall(r"--[a-z0-9-]+", text))
    for name, cls in METHODS.items():
        for f in pt.methods.get_method(name).config_class.__dataclass_fields__.values():
            if f.metadata.get("cli", True) is not False:
                flag = "--" + f.name.replace("_", "-")
                assert flag in flags, f"{name}: config field {f.name} has no `prefixtune train` option {flag}"


@torch.no_grad()
def _logits(model):
    ids = torch.tensor([[3, 14, 15, 22, 7]])
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6]])} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, **extra).logits


WEIGHT_WITH_PEFT = [n for n, cls in TEXT.items() if cls.kind == "weight" and cls.peft_type]


@pytest.mark.parametrize("arch", list(GENERATION_ARCHS))
@pytest.mark.parametrize("name", WEIGHT_WITH_PEFT)
def test_peft_export_and_import_give_equal_logits(name, arch, tmp_path):
    """A weight method with a PEFT format: its exported folder loaded by PEFT itself gives the logits of
    the method, and importing the folder back gives them too."""
    from peft import PeftModel

    make_model, tok, _ = _setup(name, arch)
    model = make_model()
    method = _build(name, model, tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the init (LoRA's B, IA3's ones leave the model unchanged)
        for p in method.trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ours, base = _logits(model), None
    artifact = method.export()
    method.detach()
    base = _logits(model)
    assert not torch.allclose(ours, base, atol=1e-4)
    pt.export_peft(artifact, tmp_path / "adapter", model=model)
    peft_model = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(peft_model), ours, rtol=1e-5, atol=1e-5)
    fresh = make_model()
    attached = attach(fresh, pt.import_peft(tmp_path / "adapter", fresh))
    torch.testing.assert_close(_logits(fresh), ours, rtol=1e-5, atol=1e-5)
    attached.detach()
    assert torch.equal(_logits(fresh), base)


@pytest.mark.parametrize("arch", list(GENERATION_ARCHS))
@pytest.mark.parametrize("name", [n for n, cls in TEXT.items() if cls.kind == "weight"])
def test_weight_methods_leave_the_model_unchanged_until_trained(name, arch):
    """Zero up-projections (adapters), zero B (LoRA), unit scales ((IA)³), untouched copies (fine-tuning):
    a freshly built weight method gives the base model's logits bit for bit."""
    make_model, tok, _ = _setup(name, arch)
    model = make_model()
    base = _logits(model)
    _build(name, model, tok)
    assert torch.equal(_logits(model), base)
