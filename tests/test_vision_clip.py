"""CoOp, CoCoOp and DAPL on a tiny random HF CLIPModel (methods/coop.py).

  * context taken from word embeddings == those words written in the prompt (class token at the end,
    in the middle, at the front; shared and class-specific context; DAPL's two context blocks);
  * a batch of classes == each class's prompt alone; CoCoOp's per-image prompts == image by image;
  * zero-shot "a photo of a {}." is the zero-step CoOp with ctx_init "a photo of a";
  * trained end to end a few steps through the one trainer (mechanics only: no CLIP weights offline).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from prefixtune.methods import build, get_method, load_artifact
from prefixtune.methods.coop import clip_logits, image_features, text_features, zero_shot_logits
from prefixtune.vision import Image, ImageProcessor

WORDS = ["<pad>", "<bos>", "a", "photo", "of", "the", "X", ".", "cat", "dog", "air", "plane", "big", "truck",
         "small", "bird", "in", "style", "painting", "<eos>"]
VOCAB = len(WORDS)
LABELS = ("cat", "dog", "air plane")


class WordTokenizer:
    """Whitespace word-level tokenizer over `words` ('.' split off; the last word is <eos>), with CLIP's
    special tokens."""

    bos_token_id, pad_token_id = 1, 0

    def __init__(self, words=tuple(WORDS)):
        self.words = list(words)
        self.eos_token_id = len(self.words) - 1

    def __call__(self, text, add_special_tokens=False):
        ids = [self.words.index(w) for w in text.replace(".", " .").split()]
        return {"input_ids": ids}


def tiny_clip(impl="sdpa", vocab=VOCAB, positions=32):
    torch.manual_seed(0)
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=positions, bos_token_id=1, eos_token_id=vocab - 1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7),
        projection_dim=16)
    model = tf.CLIPModel(cfg)
    model.set_attn_implementation(impl)
    return model.eval().requires_grad_(False)


def processor(words=tuple(WORDS)):
    proc = ImageProcessor(size=28)
    proc.tokenizer = WordTokenizer(words)
    return proc


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def written(model, texts):
    """Text features of prompts written out as words, each run alone."""
    tok = WordTokenizer()
    out = []
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(t)["input_ids"] + [tok.eos_token_id]])
        out.append(text_features(model, ids))
    return torch.cat(out)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("position,template", [("end", "a photo of the {} ."), ("middle", "a photo {} of the ."),
                                               ("front", "{} a photo of the .")])
def test_context_from_words_equals_the_words_written(impl, position, template):
    model = tiny_clip(impl)
    coop = build(model, "coop", processor(), ctx_init="a photo of the", class_position=position, num_labels=3,
                 labels=LABELS)
    assert coop.n_ctx == 4
    with torch.no_grad():
        got = coop.encode_text(coop.class_context(), [0, 1, 2])            # a batch of classes
        ref = written(model, [template.format(c) for c in LABELS])        # each prompt alone, written out
        for c in range(3):
            alone = coop.encode_text(coop.class_context()[c:c + 1], [c])
            assert (alone[0] - ref[c]).abs().max() <= 1e-5
    assert (got - ref).abs().max() <= 1e-5
    assert (ref[0] - ref[1]).abs().max() > 1e-3


def test_class_specific_context_and_zero_shot_baseline():
    model = tiny_clip()
    coop = build(model, "coop", processor(), ctx_init="a photo of the", class_specific=True, num_labels=3, labels=LABELS)
    assert coop.ctx.shape == (3, 4, 32)
    emb = model.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        coop.ctx[1] = emb[torch.tensor([12, 13, 16, 5])]          # class 1's own words: "big truck in the"
        got = coop.encode_text(coop.class_context(), [0, 1, 2])
    ref = written(model, ["a photo of the cat .", "big truck in the dog .", "a photo of the air plane ."])
    assert (got - ref).abs().max() <= 1e-5
    # zero-shot CLIP with 'a photo of the {}.' == CoOp's logits at zero steps with that context
    shared = build(model, "coop", processor(), ctx_init="a photo of the", num_labels=3, labels=LABELS)
    x = torch.randn(2, 3, 28, 28)
    zs = zero_shot_logits(model, WordTokenizer(), x, LABELS, template="a photo of the {}.")
    with torch.no_grad():
        assert (shared.image_logits(x) - zs).abs().max() <= 1e-4


def test_cocoop_per_image_prompts_equal_image_by_image():
    model = tiny_clip()
    cocoop = build(model, "cocoop", processor(), ctx_init="a photo of the", num_labels=3, labels=LABELS)
    with torch.no_grad():
        for p in cocoop.meta_net.parameters():
            p.normal_(0, 0.5)
        x = torch.randn(3, 3, 28, 28)
        batch = cocoop.image_logits(x)
        img = image_features(model, x)
        for r in range(3):
            one = cocoop.image_logits(x[r:r + 1])
            assert (batch[r] - one[0]).abs().max() <= 1e-4
            # reference: the Meta-Net's token added to every context vector, prompts encoded alone
            pi = cocoop.meta_net(img[r:r + 1] / img[r:r + 1].norm(dim=-1, keepdim=True))
            txt = torch.cat([cocoop.encode_text(cocoop.ctx + pi[:, None], [c]) for c in range(3)])
            assert (clip_logits(model, img[r:r + 1], txt)[0] - batch[r]).abs().max() <= 1e-4
        plain = build(model, "coop", processor(), ctx_init="a photo of the", num_labels=3, labels=LABELS).image_logits(x)
    assert (batch - plain).abs().max() > 1e-3, "the Meta-Net's token must change the prompts"


def test_dapl_prompts_are_agnostic_then_domain_context_then_class():
    model = tiny_clip()
    dapl = build(model, "dapl", processor(), ctx_init="a photo", domain_length=2, num_labels=3, labels=LABELS,
                 domains=("photo", "painting"))
    emb = model.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        dapl.domain_ctx[0] = emb[torch.tensor([4, 5])]            # "of the"
        dapl.domain_ctx[1] = emb[torch.tensor([16, 18])]          # "in painting"
        x = torch.randn(2, 3, 28, 28)
        got = dapl.all_logits(x)
    texts = [f"a photo {d} {c} ." for d in ("of the", "in painting") for c in LABELS]
    ref = clip_logits(model, image_features(model, x), written(model, texts))
    assert got.shape == (2, 6) and (got - ref).abs().max() <= 1e-4
    assert torch.equal(dapl.image_logits(x, domain=1), got[:, 3:])


def random_images(n, seed, targets):
    from prefixtune.data import Example

    rng = np.random.default_rng(seed)
    return [Example(Image(f"c{seed}/{i}", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), targets[i % len(targets)])
            for i in range(n)]


@pytest.mark.parametrize("method,targets", [("coop", LABELS), ("cocoop", LABELS),
                                            ("dapl", ("cat", "dog", "target/air plane", "target/?"))])
def test_trained_end_to_end_through_the_trainer(tmp_path, method, targets):
    """Mechanics: the loss falls on a tiny random CLIP, the context moves, the artifact reloads exactly."""
    from prefixtune.train import TrainConfig, train

    model = tiny_clip()
    torch.manual_seed(0)
    kw = dict(domain_length=2, threshold=0.0) if method == "dapl" else {}
    m = build(model, method, processor(), length=4, num_labels=3, labels=LABELS, **kw)
    start = {n: p.detach().clone() for n, p in m.trainable().items()}
    train_items = random_images(12, 0, targets)
    log = []
    res = train(m, m.processor, train_items, random_images(6, 1, targets),
                TrainConfig(lr=5e-2, epochs=8, batch_size=6, log_every=100), tmp_path, print_fn=log.append)
    assert res["steps"] == 16
    losses = [float(line.split("dev loss ")[1].split()[0]) for line in log if "dev loss" in line]
    assert losses[-1] < losses[0]
    moved = {n for n, p in m.trainable().items() if not torch.equal(start[n], p)}
    assert "ctx" in moved and ("meta_net.linear2.bias" in moved if method == "cocoop" else True)
    assert "domain_ctx" in moved if method == "dapl" else True
    x = m.pixels([e.source for e in train_items[:4]])
    with torch.no_grad():
        want = m.image_logits(x)
    fresh = tiny_clip()
    loaded = get_method(method).from_artifact(fresh, load_artifact(res["artifact_path"], fresh), tokenizer=processor())
    with torch.no_grad():
        best = res["artifact"].tensors
        m.load_named(best, "best")
        assert (loaded.image_logits(x) - m.image_logits(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("method,kw", [("coop", {"length": 28}), ("dapl", {"length": 16, "domain_length": 12})])
def test_a_prompt_longer_than_clips_positions_is_refused_at_build(method, kw):
    """32 positions: <bos> + context + 'air plane' + '.' + <eos> must fit (28 context: 33 tokens, one too many)."""
    with pytest.raises(ValueError, match=r"'air plane' needs 33 tokens .* holds 32; use fewer context"):
        build(tiny_clip(), method, processor(), num_labels=3, labels=LABELS, **kw)
    fits = dict(kw, length=kw["length"] - 1) if method == "coop" else dict(kw, domain_length=10)
    build(tiny_clip(), method, processor(), num_labels=3, labels=LABELS, **fits)
