"""What each training option does, pinned by value: the learning-rate schedule, gradient
clipping (under a GradScaler too), which parameters decay, the loss the progress line shows, when
the run evaluates and writes best.pt and last.pt, and evaluation leaving the training trajectory
alone."""

import math
import time

import pytest
import torch

from tinygpt import checkpoint
from tinygpt import progress as progress_mod
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


@pytest.mark.parametrize("it,expected", [
    (9, 1e-3 * 10 / 11), (10, 1e-3),  # the same warm-up and peak
    (35, 1e-4 + 0.9e-3 * 3 / 4), (60, (1e-3 + 1e-4) / 2), (85, 1e-4 + 0.9e-3 / 4),  # a line
    (110, 1e-4), (10_000, 1e-4),
])
def test_linear_decay(it, expected):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110,
                      lr_decay="linear")
    assert lr_at(it, cfg) == pytest.approx(expected, rel=1e-12)


def _record_steps(monkeypatch):
    """Each step's learning rates (optimizer -> rate) and the global norm of the gradients the
    optimizers apply, over all of them."""
    steps = []

    def make(model, cfg, device):
        optimizers = make_optimizer(model, cfg, device)
        rates, squares = {}, []

        def before_step(opt, args, kwargs):
            grads = [p.grad for group in opt.param_groups for p in group["params"]]
            # a fused optimizer is handed a GradScaler's scale and takes it out itself
            scale = getattr(opt, "grad_scale", None)
            squares.append(sum(g.double().square().sum().item() for g in grads)
                           / (1 if scale is None else scale.item()) ** 2)
            name = next(n for n, o in optimizers.parts.items() if o is opt)
            rates[name] = opt.param_groups[0]["lr"]
            if len(rates) == len(optimizers.parts):  # the last part of this step
                steps.append((dict(rates), sum(squares) ** 0.5))
                rates.clear()
                squares.clear()

        for part in optimizers.parts.values():
            part.register_step_pre_hook(before_step)
        return optimizers

    monkeypatch.setattr(train_mod, "make_optimizer", make)
    return steps


def test_steps_follow_the_schedule_and_clipping_bounds_the_gradient_norm(
        tmp_path, small_text_file, monkeypatch):
    steps = _record_steps(monkeypatch)
    tiny_run(tmp_path / "clipped", small_text_file, max_iters=6, eval_interval=6, warmup_iters=2,
             lr_decay_iters=5, min_lr=3e-4, grad_clip=0.05, optimizer="muon", muon_lr=0.05)
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_iters=2, lr_decay_iters=5)
    assert [lr["adamw"] for lr, _ in steps] == pytest.approx([lr_at(i, cfg) for i in range(6)])
    assert [lr["muon"] for lr, _ in steps] == pytest.approx(
        [lr_at(i, cfg) * 0.05 / 3e-3 for i in range(6)])
    assert all(norm <= 0.05 * (1 + 1e-5) for _, norm in steps), steps
    steps.clear()
    tiny_run(tmp_path / "free", small_text_file, max_iters=6, eval_interval=6, grad_clip=0.0)
    assert max(norm for _, norm in steps) > 0.2  # so the bound above was the clipping's doing


def test_clipping_bounds_the_true_gradients_under_a_grad_scaler(tmp_path, small_text_file,
                                                               monkeypatch):
    """fp16 autocast (GPUs before sm_80; the CPU has a GradScaler too) scales the loss by 2**16
    for the backward pass and a GradScaler takes the scale out again: the optimizer must step on
    the true gradients clipped to grad_clip, not on clipped scaled ones shrunk by the scale."""
    monkeypatch.setattr(train_mod.ops, "precision",
                        lambda device: (torch.float16, "fp16 autocast + GradScaler"))
    scalers = []

    class Watched(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Watched)
    steps = _record_steps(monkeypatch)
    tiny_run(tmp_path, small_text_file, max_iters=4, eval_interval=4, grad_clip=0.05,
             optimizer="muon")
    assert scalers[0].is_enabled() and scalers[0].get_scale() == 2**16
    assert len(steps) == 4 and all(norm <= 0.05 * (1 + 1e-3) for _, norm in steps), steps
    assert max(norm for _, norm in steps) >= 0.05 * (1 - 1e-3), steps


def test_the_logged_loss_is_the_mean_over_micro_batches(tmp_path, small_text_file, monkeypatch):
    """With --grad-accum 3 the progress line shows each step's loss: the mean of its three
    micro-batches' losses, not their sum."""
    micro, logged, in_step = [], [], []
    forward = GPT.forward

    def forward_watched(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if in_step:
            micro.append(loss.item())
        return logits, loss

    step = train_mod._Run.step

    def step_watched(self, it):
        in_step.append(it)
        try:
            return step(self, it)
        finally:
            in_step.clear()

    monkeypatch.setattr(GPT, "forward", forward_watched)
    monkeypatch.setattr(train_mod._Run, "step", step_watched)
    monkeypatch.setattr(progress_mod.Progress, "update", lambda self, it, loss: logged.append(loss))
    train("cpu-baby", {**TINY, "out_dir": str(tmp_path), "max_iters": 4, "eval_interval": 4,
                       "grad_accum": 3}, data=str(small_text_file), log_interval=1)
    assert len(micro) == 12
    assert logged == pytest.approx([sum(micro[i:i + 3]) / 3 for i in range(0, 12, 3)])


def test_the_last_step_is_evaluated_and_saved_whatever_the_interval(tmp_path, small_text_file):
    """--max-iters 7 with --eval-interval 3: evaluations at 0, 3, 6 and 7, and last.pt holds
    step 7, evaluated, so that nothing trained is lost."""
    summary = tiny_run(tmp_path, small_text_file, max_iters=7, eval_interval=3)
    assert [h["iter"] for h in summary["history"]] == [0, 3, 6, 7]
    last = load_checkpoint(tmp_path / "last.pt")
    assert (last["iteration"], last["evaluated"]) == (7, True)
    assert last["best_val_loss"] == min(h["val"] for h in summary["history"])
    weights = summary["model"].state_dict()
    assert all(torch.equal(last["model"][k], weights[k]) for k in weights)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weight_decay_reaches_matrices_and_embeddings_only(optimizer):
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                            bias=True))
    cfg = TrainConfig(weight_decay=0.1, optimizer=optimizer)
    groups = [group for part in make_optimizer(model, cfg, torch.device("cpu")).parts.values()
              for group in part.param_groups]
    decay = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay) == len(names) == sum(len(g["params"]) for g in groups)
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
    save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint",
                        lambda path, payload: saved.append((path.name, payload["iteration"]))
                        or save(path, payload))
    summary = tiny_run(tmp_path, small_text_file, max_iters=8, eval_interval=2)
    assert [it for name, it in saved if name == "best.pt"] == [0, 2, 6]
    assert [it for name, it in saved if name == "last.pt"] == [0, 2, 4, 6, 8]
    best = load_checkpoint(tmp_path / "best.pt")
    assert (best["iteration"], best["best_val_loss"]) == (6, 2.4)
    assert load_checkpoint(tmp_path / "last.pt")["best_val_loss"] == summary["best_val_loss"] == 2.4


def test_a_resumed_run_keeps_its_best_val_loss(tmp_path, small_text_file, monkeypatch):
    """best.pt is replaced only by a model better than every earlier one, the first run's too."""
    vals = iter([3.0, 2.5, 2.7, 2.6, 2.55])  # steps 0, 2, 4; resumed at 4: steps 6, 8
    monkeypatch.setattr(train_mod, "estimate_loss",
                        lambda *args: {"train": 9.0, "val": next(vals)})
    tiny_run(tmp_path, small_text_file, max_iters=4, eval_interval=2)
    best = (tmp_path / "best.pt").read_bytes()
    resumed = train("cpu-baby", {"out_dir": str(tmp_path), "max_iters": 8}, resume=True,
                    log_interval=1000)
    assert (tmp_path / "best.pt").read_bytes() == best
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == 2
    assert resumed["best_val_loss"] == load_checkpoint(tmp_path / "last.pt")["best_val_loss"] == 2.5


def test_evaluation_time_is_left_out_of_ms_per_iter(tmp_path, small_text_file, monkeypatch,
                                                    capsys):
    """Each evaluation takes a second here, the steps around it milliseconds: the progress line
    after an evaluation shows the steps' speed, not the evaluation's."""
    estimate = train_mod.estimate_loss

    def slow_estimate(*args):
        time.sleep(1.0)
        return estimate(*args)

    monkeypatch.setattr(train_mod, "estimate_loss", slow_estimate)
    train("cpu-baby", {**TINY, "out_dir": str(tmp_path), "max_iters": 4, "eval_interval": 2},
          data=str(small_text_file), log_interval=1)
    speeds = [float(line.split(" | ")[1].removesuffix(" ms/iter"))
              for line in capsys.readouterr().err.splitlines() if "ms/iter |" in line]
    assert len(speeds) == 3 and max(speeds) < 500, speeds  # steps 2 to 4


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
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    progress = progress_mod.Progress(total=100, tokens_per_iter=1000)
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
