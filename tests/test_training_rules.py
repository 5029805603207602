"""What each training option does, pinned by value: the learning-rate schedule, gradient
clipping, which parameters decay, when best.pt is written, and evaluation leaving the training
trajectory alone."""

import math

import pytest
import torch

from tinygpt import train as train_mod
from tinygpt.checkpoint import load_checkpoint
from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.model import GPT
from tinygpt.optim import lr_at, make_optimizer
from tinygpt.train import train

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, dropout=0.0,
            eval_iters=2, lr=3e-3, device="cpu", backend="torch")


def tiny_run(out_dir, text_file, **kw):
    return train("cpu-baby", {**TINY, "out_dir": str(out_dir), **kw}, data=str(text_file),
                 log_interval=1000)


@pytest.mark.parametrize("it,expected", [
    (0, 1e-3 * 1 / 11), (4, 1e-3 * 5 / 11), (9, 1e-3 * 10 / 11),  # linear warm-up
    (10, 1e-3),  # the peak, where the cosine starts
    (35, 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2),  # a quarter of the way down
    (60, (1e-3 + 1e-4) / 2),  # halfway
    (110, 1e-4), (111, 1e-4), (10_000, 1e-4),  # reached min_lr, and stays there
])
def test_learning_rate_schedule(it, expected):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(it, cfg) == pytest.approx(expected, rel=1e-12)


def _record_steps(monkeypatch):
    """Each optimizer step's learning rate and the global norm of the gradients it applies."""
    steps = []

    def make(model, cfg, device):
        optimizer = make_optimizer(model, cfg, device)

        def before_step(opt, args, kwargs):
            grads = [p.grad for group in opt.param_groups for p in group["params"]]
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
            steps.append((opt.param_groups[0]["lr"], norm))

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(train_mod, "make_optimizer", make)
    return steps


def test_steps_follow_the_schedule_and_clipping_bounds_the_gradient_norm(
        tmp_path, small_text_file, monkeypatch):
    steps = _record_steps(monkeypatch)
    tiny_run(tmp_path / "clipped", small_text_file, max_iters=6, eval_interval=6, warmup_iters=2,
             lr_decay_iters=5, min_lr=3e-4, grad_clip=0.05)
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_iters=2, lr_decay_iters=5)
    assert [lr for lr, _ in steps] == pytest.approx([lr_at(i, cfg) for i in range(6)])
    assert all(norm <= 0.05 * (1 + 1e-5) for _, norm in steps), steps
    steps.clear()
    tiny_run(tmp_path / "free", small_text_file, max_iters=6, eval_interval=6, grad_clip=0.0)
    assert max(norm for _, norm in steps) > 0.2  # so the bound above was the clipping's doing


def test_weight_decay_reaches_matrices_and_embeddings_only():
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                            bias=True))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups
             for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay) == len(names) == sum(len(g["params"]) for g in optimizer.param_groups)
    for name, p in names.items():
        assert decay[id(p)] == (0.1 if p.dim() == 2 else 0.0), name
    assert decay[id(names["blocks.0.ln1.weight"])] == decay[id(names["ln_f.bias"])] == 0.0
    assert decay[id(names["blocks.1.attn.qkv.bias"])] == 0.0
    assert decay[id(names["tok_emb.weight"])] == decay[id(names["blocks.1.mlp.fc.weight"])] == 0.1


def test_best_checkpoint_is_written_only_when_val_improves(tmp_path, small_text_file,
                                                           monkeypatch):
    vals = iter([3.0, 2.5, 2.7, 2.4, 2.6])  # evaluations at steps 0, 2, 4, 6, 8
    monkeypatch.setattr(train_mod, "estimate_loss",
                        lambda *args: {"train": 9.0, "val": next(vals)})
    saved = []
    save = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint",
                        lambda path, payload: saved.append((path.name, payload["iteration"]))
                        or save(path, payload))
    summary = tiny_run(tmp_path, small_text_file, max_iters=8, eval_interval=2)
    assert [it for name, it in saved if name == "best.pt"] == [0, 2, 6]
    assert [it for name, it in saved if name == "last.pt"] == [0, 2, 4, 6, 8]
    best = load_checkpoint(tmp_path / "best.pt")
    assert (best["iteration"], best["best_val_loss"]) == (6, 2.4)
    assert load_checkpoint(tmp_path / "last.pt")["best_val_loss"] == summary["best_val_loss"] == 2.4


def test_evaluation_leaves_the_training_trajectory_alone(tmp_path, small_text_file):
    """Evaluating after every step draws its own batches, with dropout off and no gradients: the
    weights after 6 steps are those of a run that evaluates only at the end."""
    often = tiny_run(tmp_path / "often", small_text_file, max_iters=6, eval_interval=1,
                     dropout=0.1)
    once = tiny_run(tmp_path / "once", small_text_file, max_iters=6, eval_interval=6, dropout=0.1)
    assert len(often["history"]) == 7 and len(once["history"]) == 2
    a, b = often["model"].state_dict(), once["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_long_evaluation_shows_its_progress_and_leaves_it_out_of_the_speed(monkeypatch,
                                                                             capsys):
    """Off a terminal: a line every 30 s of an evaluation (none for a short one), and ms/iter
    measured without the evaluation's time."""
    now = [0.0]
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: now[0])
    progress = train_mod.Progress(total=100, tokens_per_iter=1000)
    progress.update(10, 2.5)
    for t, done in [(1.0, 0), (20.0, 100), (31.0, 200), (50.0, 300), (61.5, 390)]:
        now[0] = t
        progress.evaluating(10, done, 400)
    progress.exclude(61.0)  # the evaluation took 61 s ...
    now[0] = 63.0
    progress.update(20, 2.4)  # ... and the 10 steps around it 2 s
    assert capsys.readouterr().err.splitlines()[1:] == [
        "evaluating step 10: batch 200/400 (30 s)",
        "evaluating step 10: batch 390/400 (60 s)",
        "[####................] 20/100 loss 2.4000 | 200.0 ms/iter | 5,000 tok/s",
    ]
