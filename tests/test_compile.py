"""torch.compile over a prefixed model: the same loss and gradients as eager, and dynamo never traces
into prefixtune's attention functions (they are `torch.compiler.disable`d: traced, they broke the graph
at their context variable and their per-forward memo made dynamo recompile)."""

from __future__ import annotations

import pytest
import torch

import prefixtune as pt
from prefixtune.compiling import compiled_layers
from prefixtune.engine import target_loss

from conftest import tiny

SHAPES = (12, 15, 9)  # sequence lengths: varying batches, as training's length buckets give


def _batch(model, length: int):
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(5, model.config.vocab_size, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return ids, mask, labels


def _step(pm, model, length: int):
    ids, mask, labels = _batch(model, length)
    loss = target_loss(pm.model, pm.rows(), ids, mask, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compiled_layers_give_the_eager_loss_and_gradients(attn):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny("llama", attn)
    torch.manual_seed(0)
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=3))
    eager = {n: _step(pm, model, n) for n in SHAPES}
    try:
        with compiled_layers(pm):  # regional compilation, as `train --compile`
            for _ in range(2):
                for n in SHAPES:
                    loss, grads = _step(pm, model, n)
                    ref_loss, ref_grads = eager[n]
                    assert torch.allclose(loss, ref_loss, atol=1e-5), (n, loss, ref_loss)
                    assert grads.keys() == ref_grads.keys()
                    for name in grads:
                        assert torch.allclose(grads[name], ref_grads[name], atol=1e-5), (n, name)
        traced_into_ours = [reason for reason in counters["graph_break"] if "ContextVar" in reason]
        assert not traced_into_ours, traced_into_ours
    finally:
        torch._dynamo.reset()


def test_a_compiled_training_run_logs_the_eager_runs_losses_and_leaves_the_layers_eager(tmp_path):
    import json

    from prefixtune.train import TrainConfig, train

    from conftest import reversal_pairs, tiny_tokenizer

    def run(compile_: bool):
        torch._dynamo.reset()
        model, tok = tiny("llama"), tiny_tokenizer("llama")
        torch.manual_seed(0)
        pm = pt.PrefixModel(model, pt.PrefixConfig(length=3, mlp_hidden=16))
        out = tmp_path / f"compile-{compile_}"
        cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=6, max_steps=6, eval_every=3, log_every=100, compile=compile_)
        train(pm, tok, reversal_pairs(36), reversal_pairs(12, seed=1), cfg, out, print_fn=lambda s: None)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return pm, [r["loss"] for r in log if "loss" in r], [r["dev_loss"] for r in log if "dev_loss" in r]

    from torch._dynamo.utils import counters

    _, eager_losses, eager_dev = run(False)
    counters.clear()
    pm, losses, dev = run(True)
    compiled_graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert compiled_graphs >= 1  # the run did compile
    assert len(losses) == len(eager_losses) == 6 and len(dev) == len(eager_dev) >= 2
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses + dev, eager_losses + eager_dev)), (losses, eager_losses)
    assert all("forward" not in vars(layer) for layer in pm.model.model.layers)  # compiled forwards removed


def test_compiling_keeps_a_forward_the_layer_already_had():
    # accelerate's device-map hooks replace a module's forward with their own: it must survive compiling
    model = tiny("llama")
    layer = model.model.layers[0]
    own = layer.forward
    layer.forward = own  # now an instance attribute, as a hook's wrapper would be
    with compiled_layers(model) as layers:
        assert len(layers) == 2 and vars(layer)["forward"] is not own
    assert vars(layer)["forward"] is own and "forward" not in vars(model.model.layers[1])
    with pytest.raises(ValueError, match="no transformer layers"):
        with compiled_layers(torch.nn.Linear(2, 2)):
            pass


def test_compiled_encoder_decoder_layers_give_the_eager_loss_and_gradients():
    # T5: encoder, decoder and cross-attention prefixes, and the relative position bias threaded through the layers
    torch._dynamo.reset()
    model = tiny("t5")
    torch.manual_seed(0)
    pm = pt.PrefixModel(model, pt.PrefixConfig(length=3))

    def step(length: int):
        ids, mask, _ = _batch(model, length)
        labels = torch.randint(5, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(length + 1))
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels, loss_on_targets=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        pm.zero_grad()
        return loss.detach(), grads

    eager = {n: step(n) for n in SHAPES[:2]}
    try:
        with compiled_layers(pm):
            for n in SHAPES[:2]:
                loss, grads = step(n)
                assert torch.allclose(loss, eager[n][0], atol=1e-5)
                assert all(torch.allclose(grads[k], eager[n][1][k], atol=1e-5) for k in eager[n][1])
    finally:
        torch._dynamo.reset()


def test_compiling_raises_dynamos_recompile_limit_for_the_block_only():
    # SmolLM2's 30 layers needed more than the default 8 versions of the shared layer code
    from prefixtune.compiling import RECOMPILE_LIMIT

    default = torch._dynamo.config.recompile_limit
    with compiled_layers(tiny("llama")):
        assert torch._dynamo.config.recompile_limit == max(RECOMPILE_LIMIT, default) > 8
    assert torch._dynamo.config.recompile_limit == default
