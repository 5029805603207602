"""Generation: the key/value cache gives the same tokens, sampling filters hold, output streams."""

import pytest
import torch

import tinygpt.generate
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import main
from tinygpt.config import ModelConfig
from tinygpt.data import Tokenizer
from tinygpt.generate import generate, next_token_probs, sample_next
from tinygpt.model import GPT


def model_for_generation(block_size=24, backend="torch", dtype=torch.float64, vocab_size=13):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                      n_embd=32, dropout=0.0)
    model = GPT(cfg, backend=backend).to(dtype).eval()
    with torch.no_grad():  # sharper distributions than the near-uniform init
        for p in model.parameters():
            p.mul_(6.0) if p.dim() == 2 else None
    return model


def saved_for_sampling(path, vocab: str, **kw) -> GPT:
    """`model_for_generation` over `vocab`, saved as a checkpoint at `path` for `tinygpt sample`."""
    model = model_for_generation(dtype=torch.float32, vocab_size=len(vocab), **kw)
    save_checkpoint(path, {"model_config": vars(model.config), "train_config": {},
                           "iteration": 0, "model": model.state_dict(), "vocab": vocab})
    return model


def run(model, prompt, n, cache, temperature=1.0, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return generate(model, prompt, n, temperature=temperature, generator=gen, cache=cache, **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_gives_the_same_tokens_within_the_block(temperature):
    model = model_for_generation()
    prompt = torch.randint(0, 13, (3, 5))
    uncached = run(model, prompt, 19, "off", temperature)  # 5 + 19 = block_size
    for mode in ("shift", "exact"):
        assert torch.equal(run(model, prompt, 19, mode, temperature), uncached), mode


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_exact_mode_matches_uncached_past_the_block(temperature):
    model = model_for_generation()
    prompt = torch.randint(0, 13, (2, 7))
    assert torch.equal(run(model, prompt, 60, "exact", temperature),
                       run(model, prompt, 60, "off", temperature))


def test_shift_mode_keeps_between_half_and_full_context(monkeypatch):
    model = model_for_generation(block_size=16)
    contexts = []
    forward = GPT.forward

    def spy(self, idx, targets=None, cache=None):
        start = 0 if cache is None else cache.length
        contexts.append(start + idx.shape[1])  # positions the prediction conditions on
        return forward(self, idx, targets, cache)

    monkeypatch.setattr(GPT, "forward", spy)
    out = run(model, torch.randint(0, 13, (1, 10)), 70, "shift")
    assert out.shape == (1, 80)
    assert contexts[0] == 10 and all(8 <= c <= 16 for c in contexts)
    assert contexts.count(8) >= 3  # it shifted several times, each time to the newest half


def test_shift_mode_context_sizes_follow_the_schedule(monkeypatch):
    model = model_for_generation(block_size=16)
    sizes = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, targets=None, cache=None: (
        sizes.append((cache.length if cache is not None else 0, idx.shape[1])),
        forward(self, idx, targets, cache))[1])
    run(model, torch.randint(0, 13, (1, 16)), 20, "shift")
    # a full prompt: prefill 16, then a shift to the newest 8 and one-token steps up to 16 again
    assert sizes[:3] == [(0, 16), (0, 8), (8, 1)]
    assert sizes.count((0, 8)) == 3 and all(t == 1 for start, t in sizes if start)


def test_shift_mode_predicts_from_the_newest_characters(monkeypatch):
    """Each step's logits are the uncached model's on the newest characters of the text, as many
    as the schedule keeps: the prompt, one more a step up to block_size, then the newest
    block_size / 2 after each shift."""
    model = model_for_generation(block_size=16)
    seen = []
    draw = tinygpt.generate.sample_next
    monkeypatch.setattr(tinygpt.generate, "sample_next",
                        lambda logits, *args: seen.append(logits) or draw(logits, *args))
    out = run(model, torch.randint(0, 13, (2, 10)), 40, "shift")  # (2, 50)
    context = 10
    for step, logits in enumerate(seen):
        end = 10 + step  # the characters known when this token was drawn
        expected = model(out[:, end - context:end])[0][:, -1]  # (2, V)
        torch.testing.assert_close(logits, expected, msg=f"step {step}, context {context}")
        context = context + 1 if context < 16 else 8
    assert len(seen) == 40


def test_bigram_generation_ignores_the_cache():
    from tinygpt.model import BigramLanguageModel

    model = BigramLanguageModel(ModelConfig(model="bigram", vocab_size=13, block_size=8)).eval()
    prompt = torch.randint(0, 13, (1, 3))
    assert torch.equal(run(model, prompt, 30, "shift"), run(model, prompt, 30, "off"))


def test_top_k_and_top_p_stay_in_their_sets():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    picked = set(sample_next(logits, top_k=3, generator=gen).unique().tolist())
    assert picked == {0, 1, 5}
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(0)
    allowed = set(order[: int((cumulative < 0.8).sum()) + 1].tolist())  # smallest set with >= 0.8
    picked = set(sample_next(logits, top_p=0.8, generator=gen).unique().tolist())
    assert picked == allowed and len(allowed) < 7
    picked = set(sample_next(logits, top_k=2, top_p=0.99, generator=gen).unique().tolist())
    assert picked == {0, 5}
    assert sample_next(logits[:1], temperature=0.0).item() == 5


def test_cached_generation_on_the_triton_backend():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU
    ref = model_for_generation(dtype=torch.float32).to(device)
    fused = model_for_generation(backend="triton", dtype=torch.float32).to(device)
    prompt = torch.randint(0, 13, (1, 4), device=device)
    # greedy, in fp32 on both backends: the same tokens
    out = generate(fused, prompt, 30, temperature=0.0, cache="shift", amp=False)
    assert out.shape == (1, 34)
    assert torch.equal(out, generate(ref, prompt, 30, temperature=0.0, cache="shift", amp=False))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast is used on CUDA only")
def test_generation_runs_attention_in_bf16_on_cuda(monkeypatch):
    import tinygpt.ops

    seen = []
    attention = tinygpt.ops.attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(tinygpt.ops, "attention", spy)
    model = model_for_generation(backend="triton", dtype=torch.float32).to("cuda")
    prompt = torch.randint(0, 13, (1, 4), device="cuda")
    generate(model, prompt, 5, temperature=0.0, cache="shift")
    assert seen and set(seen) == {torch.bfloat16}


def test_sample_command_streams_exactly_the_generated_text(tmp_path, capsys):
    """What the command prints is generate()'s text at the command's default temperature, 0.8:
    the model's sharp distributions make another temperature give other text."""
    vocab = "\n !',.:;?abcdefghijklmnopqrstuvwxyz"
    model = saved_for_sampling(tmp_path / "best.pt", vocab, block_size=32)
    args = ["sample", "--out-dir", str(tmp_path), "--prompt", "to be", "--max-new-tokens", "80",
            "--seed", "3", "--device", "cpu"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    tok = Tokenizer(vocab)
    prompt = torch.tensor([tok.encode("to be")])
    expected = run(model, prompt, 80, "shift", temperature=0.8, seed=3)
    assert streamed == tok.decode(expected[0].tolist()) + "\n"
    assert main(args + ["--cache", "off", "--max-new-tokens", "27"]) == 0
    off = capsys.readouterr().out
    assert main(args + ["--max-new-tokens", "27"]) == 0
    assert capsys.readouterr().out == off  # within the block, cache or not, the same text


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits_before_the_softmax(temperature):
    logits = torch.randn(3, 13, dtype=torch.float64)
    expected = torch.softmax(logits / temperature, dim=-1).float()
    torch.testing.assert_close(next_token_probs(logits, temperature), expected)


@pytest.mark.parametrize("temperature", [1e-3, 1e-45, 1e-320])
def test_temperature_near_zero_picks_the_most_likely(temperature):
    """Down to the smallest doubles (float32 cannot hold 1e-45 / 1e-320), and with logits large
    enough that dividing them first would overflow to inf: no inf - inf, no NaN."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [-4.0, -3.0, -3.5, -9.0],
                           [60.0, 90.0, -90.0, 89.0]])
    probs = next_token_probs(logits, temperature)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 3))
    assert sample_next(logits, temperature).flatten().tolist() == [1, 1, 1]


@pytest.mark.parametrize("top_p,kept", [(0.49, 1), (0.5, 1), (0.51, 2), (0.74, 2), (0.75, 2),
                                        (0.76, 3), (0.875, 3), (0.99, 4)])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, kept):
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary, as are their running sums): the set
    whose mass first reaches top_p, not one more, also when a running sum equals it exactly."""
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
    out = next_token_probs(probs.log(), top_p=top_p)
    order = [1, 3, 0, 2]  # most likely first
    expected = torch.zeros_like(probs)
    expected[0, order[:kept]] = probs[0, order[:kept]] / probs[0, order[:kept]].sum()
    torch.testing.assert_close(out, expected)


def test_each_sample_is_new_text(tmp_path, capsys):
    """--num-samples draws its samples one after another from one seeded generator: they differ
    from each other, and the first is the text one sample with that seed gives."""
    saved_for_sampling(tmp_path / "best.pt", "\n !',.:;?abcdefghijklmnopqrstuvwxyz", block_size=32)
    args = ["sample", "--out-dir", str(tmp_path), "--prompt", "to be", "--max-new-tokens", "40",
            "--temperature", "1.0", "--seed", "5", "--device", "cpu"]
    assert main(args + ["--num-samples", "3"]) == 0
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert len(samples) == 3 and len(set(samples)) == 3, samples
    assert main(args) == 0
    assert capsys.readouterr().out == samples[0]


def test_every_sample_flag_reaches_the_sampler(tmp_path, capsys, monkeypatch):
    saved_for_sampling(tmp_path / "mine.pt", "abcdefghijklm")
    runs, draws = [], []
    real_generate, real_sample_next = tinygpt.generate.generate, tinygpt.generate.sample_next

    def spy_generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, **kw):
        runs.append((model.backend, idx.tolist(), max_new_tokens, generator.initial_seed(),
                     kw["cache"]))
        return real_generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                             **kw)

    def spy_sample_next(logits, temperature, top_k, top_p, generator):
        draws.append((temperature, top_k, top_p))
        return real_sample_next(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(tinygpt.generate, "generate", spy_generate)
    monkeypatch.setattr(tinygpt.generate, "sample_next", spy_sample_next)
    assert main(["sample", "--ckpt", str(tmp_path / "mine.pt"), "--prompt", "cab",
                 "--max-new-tokens", "4", "--temperature", "0.6", "--top-k", "5", "--top-p",
                 "0.9", "--cache", "exact", "--seed", "77", "--num-samples", "3", "--device",
                 "cpu", "--backend", "reference"]) == 0
    assert runs == [("reference", [[2, 0, 1]], 4, 77, "exact")] * 3
    assert draws == [(0.6, 5, 0.9)] * 12
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("cab") and len(s) == 3 + 4 + 1 for s in samples)
