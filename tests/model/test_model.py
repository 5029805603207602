"""Model shapes, loss at initialisation, and backend agreement."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinygpt.config import ModelConfig, from_preset
from tinygpt.errors import UserError
from tinygpt.model import GPT, BigramLanguageModel, build_model


def tiny_config(**kw) -> ModelConfig:
    values = dict(vocab_size=65, block_size=19, n_layer=2, n_head=3, n_embd=48, dropout=0.0)
    return ModelConfig(**{**values, **kw})


@pytest.mark.parametrize("model_kind", ["gpt", "bigram"])
def test_output_shapes_and_initial_loss(model_kind):
    cfg = tiny_config(model=model_kind)
    model = build_model(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 16, 19))
    logits, loss = model(idx, targets)
    assert logits.shape == (16, 19, cfg.vocab_size)
    if model_kind == "gpt":  # small init: near-uniform predictions
        assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    assert model(idx)[1] is None


def test_gpt_rejects_sequences_longer_than_block():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 20, dtype=torch.long))


def test_bigram_uses_only_the_current_token():
    model = BigramLanguageModel(tiny_config(model="bigram"))
    a = torch.tensor([[1, 2, 3]])
    b = torch.tensor([[7, 9, 3]])
    torch.testing.assert_close(model(a)[0][:, -1], model(b)[0][:, -1])


def test_gpt_is_causal():
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 65, (2, 19))
    changed = idx.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % 65
    torch.testing.assert_close(model(idx)[0][:, :11], model(changed)[0][:, :11])


@pytest.mark.parametrize("bias", [True, False])
def test_reference_and_torch_backends_agree(bias):
    cfg = tiny_config(bias=bias)
    torch.manual_seed(0)
    ref = GPT(cfg, backend="reference").double()
    fast = GPT(cfg, backend="torch").double()
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 65, (3, 19))
    logits_r, loss_r = ref(idx, idx)
    logits_t, loss_t = fast(idx, idx)
    torch.testing.assert_close(logits_r, logits_t)
    loss_r.backward()
    loss_t.backward()
    for (name, p_r), p_t in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_r.grad, p_t.grad, msg=name)


def test_weight_tying_and_presets():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.tok_emb.weight
    m, t = from_preset("shakespeare-char")
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (6, 6, 384, 256, 0.2)
    assert (t.batch_size, t.lr, t.beta2, t.max_iters) == (64, 1e-3, 0.99, 5000)
    assert (t.warmup_iters, t.min_lr, t.weight_decay, t.grad_clip) == (100, 1e-4, 0.1, 1.0)
    assert (t.eval_interval, t.eval_iters) == (250, 200)
    m, t = from_preset("cpu-baby")
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, t.batch_size) == (4, 4, 128, 64, 12)


@pytest.mark.parametrize(
    "overrides,message",
    [(dict(n_embd=100, n_head=3), "divisible"), (dict(block_size=0), "block_size"),
     (dict(dropout=1.0), "dropout"), (dict(lr=0.0), "lr"), (dict(batch_size=0), "batch_size")],
)
def test_invalid_hyperparameters(overrides, message):
    with pytest.raises(UserError, match=message):
        from_preset("cpu-baby", **overrides)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'gpt5'.*cpu-baby"):
        from_preset("gpt5")


def test_blocks_are_pre_norm():
    """The fused layout (each residual add done by the next LayerNorm) computes the textbook
    pre-norm GPT from the same weights: x += attn(ln1(x)); x += mlp(ln2(x)); head(ln_f(x)).
    Guards against a post-norm block, x = ln(x + attn(x)), which trains too."""
    model = GPT(tiny_config(bias=True), backend="reference").eval()
    with torch.no_grad():  # LayerNorm parameters away from (1, 0), so that each one counts
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.5)

    def ln(module, x):
        return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)

    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))  # (B, T, C)
    for block in model.blocks:
        x = x + block.attn(ln(block.ln1, x), "reference")
        x = x + block.mlp(ln(block.ln2, x))
    torch.testing.assert_close(model(idx)[0], model.lm_head(ln(model.ln_f, x)))


def test_initialisation_scales_the_residual_projections():
    """GPT-2's init: every weight N(0, 0.02), the two projections that write into the residual
    stream N(0, 0.02 / sqrt(2 n_layer)); biases zero, LayerNorm gains one."""
    model = GPT(tiny_config(n_layer=8, n_embd=96, n_head=3, block_size=64, bias=True))
    scaled = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():  # each random one has >= 6144 elements
        if name.endswith(("proj.weight", "qkv.weight", "fc.weight", "emb.weight")):
            std = scaled if name.endswith("proj.weight") else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.05), name
            assert abs(p.mean().item()) < 0.1 * std, name
        elif ".ln" in name or name.startswith("ln_f"):
            one = name.endswith("weight")
            assert torch.equal(p, torch.ones_like(p) if one else torch.zeros_like(p)), name
        else:
            assert name.endswith("bias") and not p.any(), name
