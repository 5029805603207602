"""The kernels' self-check (`verify.check_kernels`) and the interleaved step timer.

The self-check must pass the kernels as they are, in fp32 and, with conftest.py's exact bf16
dots, in bf16 under the autocast dtypes; and it must fail, naming the op and the tensor, a kernel
made wrong on purpose in its output, one gradient, or the dropout mask its backward regenerates.
"""


import pytest
import torch
from tinygpt.kernels import flash_attention as attention_module
from tinygpt.kernels import layernorm as layernorm_module

from tinygpt import optim, verify
from tinygpt.config import ModelConfig, TrainConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPS = ["attention_qkv (causal)", "attention_qkv (causal, dropout 0.2)",
       "attention (decoding: 1 query, 36 cached keys)", "add_layer_norm", "layer_norm"]


def small(dtype=torch.float32, **kw) -> verify.Shape:
    """T = 37 and N = 48: no multiple of any block; head dim 24, padded to 32."""
    return verify.Shape(**{**dict(batch=1, block=37, heads=2, head_dim=24, dtype=dtype), **kw})


def by_op(checks):
    return {c.op.split(" (")[0] if "layer_norm" in c.op else c.op: c for c in checks}


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None),
                                             (torch.bfloat16, torch.bfloat16)], ids=str)
def test_the_kernels_as_they_are_pass(dtype, out_dtype):
    """fp32 as on the CPU; bf16 activations with bf16 LayerNorm outputs as under autocast."""
    checks = verify.check_kernels(small(dtype, bias=True), DEVICE, out_dtype)
    assert list(by_op(checks)) == OPS
    for check in checks:
        assert check.passed and check.ratio < check.limit * 5, check.describe()
    dropout = by_op(checks)["attention_qkv (causal, dropout 0.2)"]
    assert "kept 0." in dropout.note
    assert by_op(checks)["add_layer_norm"].op == (
        "add_layer_norm (bfloat16 + float32 -> bfloat16)" if out_dtype else
        "add_layer_norm (float32 + float32 -> float32)")


def _scaled(fn, index: int, factor: float = 1.01):
    """`fn` with its output `index` (or, for a launcher that writes in place, its argument
    `index`) multiplied by `factor`."""
    def wrapper(*args):
        out = fn(*args)
        target = args[index] if out is None else out[index]
        target.mul_(factor)
        return out
    return wrapper


@pytest.mark.parametrize(
    "module,launcher,index,op,tensor",
    [(attention_module, "_launch_backward", -2, "attention_qkv (causal)", "dk"),
     (attention_module, "_launch_forward", 0, "attention_qkv (causal)", "out"),
     (layernorm_module, "_launch_forward", 0, "add_layer_norm", "y")],
    ids=["attention dK", "attention output", "add+LayerNorm output"])
def test_a_wrong_kernel_fails_by_name(monkeypatch, module, launcher, index, op, tensor):
    monkeypatch.setattr(module, launcher, _scaled(getattr(module, launcher), index))
    checks = by_op(verify.check_kernels(small(), DEVICE, None))
    assert not checks[op].passed and checks[op].tensor == tensor
    assert checks[op].ratio > 100 * checks[op].limit  # 1% against fp32's 1e-7
    assert checks[op].describe().startswith(f"FAIL  {op}")
    assert verify.worst(list(checks.values())) is next(c for c in checks.values()
                                                        if not c.passed)


def test_a_backward_that_regenerates_another_dropout_mask_fails(monkeypatch):
    """Only the gradients of the dropout op can see it: the op without dropout passes."""
    launch = attention_module._launch_backward

    def other_seed(do, q, k, v, o, lse, seed, *rest):
        return launch(do, q, k, v, o, lse, seed + 1, *rest)

    monkeypatch.setattr(attention_module, "_launch_backward", other_seed)
    checks = by_op(verify.check_kernels(small(), DEVICE, None))
    assert checks["attention_qkv (causal)"].passed
    failed = checks["attention_qkv (causal, dropout 0.2)"]
    assert not failed.passed and failed.tensor in ("dq", "dk", "dv")


def test_a_kept_fraction_off_its_probability_fails(monkeypatch):
    monkeypatch.setattr(attention_module, "_dropout_args", lambda p: (1 / (1 - p), 2**15))
    checks = by_op(verify.check_kernels(small(), DEVICE, None))
    check = checks["attention_qkv (causal, dropout 0.2)"]
    assert not check.passed and check.tensor == "dropout mask" and "kept 0.5" in check.note


def test_an_op_that_raises_fails_with_its_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available\nsecond line")

    monkeypatch.setattr(verify.kernels, "layer_norm", broken)
    check = by_op(verify.check_kernels(small(), DEVICE, None))["layer_norm"]
    assert not check.passed
    assert check.describe() == "FAIL  layer_norm: raised RuntimeError: no kernel image is available"


def test_the_rule_is_the_test_suites():
    exact = torch.zeros(100, dtype=torch.float64)
    torch_lp = torch.full((100,), 1e-3)

    def judge(err, factor=2.0, floor=0.0):
        ours = torch.full((100,), err)
        return verify._judge("op", ["y"], [ours], [torch_lp], [exact], [factor], [floor])

    assert judge(1.9e-3).passed and not judge(2.1e-3).passed
    assert judge(2.9e-3, factor=3.0).passed and not judge(3.1e-3, factor=3.0).passed
    assert judge(2.5e-3, floor=1e-3).passed  # within 2 x 1e-3 + 1e-3
    assert judge(2.5e-3, floor=1e-3).describe() == (
        "pass  op: worst y 2.50x torch's error (limit 2x, within the rule's absolute floor)")
    assert judge(2.1e-3).ratio == pytest.approx(2.1)
    nan = verify._judge("op", ["y"], [torch.full((100,), float("nan"))], [torch_lp], [exact],
                        [2.0], [1.0])
    assert nan.describe() == "FAIL  op: y: non-finite values"


def test_checks_leave_the_random_streams_alone():
    before = torch.get_rng_state()
    verify.check_kernels(small(heads=1, block=17), DEVICE, None)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_batch_checked_is_cut_to_fit_the_reference():
    assert verify.Shape(64, 256, 6, 64, torch.bfloat16).capped().batch == 64
    assert verify.Shape(64, 2048, 16, 64, torch.bfloat16).capped().batch == 1
    shape = verify.Shape(500, 512, 8, 64, torch.bfloat16).capped()
    assert shape.batch * 8 * 512**2 <= verify.REFERENCE_SCORES < 2 * shape.batch * 8 * 512**2


def test_steps_are_timed_interleaved_on_one_model(monkeypatch):
    """Every backend gets its rounds, in alternating order, after its warm-up, on the same
    model; the caller's random streams are untouched."""
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    order, models, between = [], set(), []
    build = verify.build_model

    def record(model, args):
        order.append(model.backend)
        models.add(id(model))

    def recorded(cfg, backend):
        model = build(cfg, backend)
        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(verify, "build_model", recorded)
    before = torch.get_rng_state()
    times = verify.time_steps(cfg, TrainConfig(batch_size=2), torch.device("cpu"), None,
                              ("torch", "reference"), rounds=3, warmup=1,
                              between=lambda: between.append(1))
    assert torch.equal(torch.get_rng_state(), before)
    assert order == ["torch", "reference"] + ["torch", "reference", "reference", "torch",
                                              "torch", "reference"]
    assert len(models) == 1 and len(between) == len(order)
    assert {b: len(ms) for b, ms in times.items()} == {"torch": 3, "reference": 3}
    assert all(ms > 0 for b in times for ms in times[b])


@pytest.mark.parametrize("optimizer,steps", [("muon", {"adamw": 3, "muon": 3}),
                                             ("adamw", {"adamw": 3})])
def test_the_step_timed_is_the_runs_own(monkeypatch, optimizer, steps):
    """`auto` decides by the step the run takes: with its optimizers and its batch."""
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16)
    stepped, batches = {}, []
    for name, cls in (("adamw", torch.optim.AdamW), ("muon", optim.Muon)):
        monkeypatch.setattr(cls, "step", lambda self, *a, _step=cls.step, _name=name, **k: (
            stepped.update({_name: stepped.get(_name, 0) + 1}), _step(self, *a, **k))[1])
    build = verify.build_model

    def recorded(cfg, backend):
        model = build(cfg, backend)
        model.register_forward_pre_hook(lambda model, args: batches.append(args[0].shape[0]))
        return model

    monkeypatch.setattr(verify, "build_model", recorded)
    verify.time_steps(cfg, TrainConfig(batch_size=3, optimizer=optimizer), torch.device("cpu"),
                      None, ("torch",), rounds=2, warmup=1)
    assert stepped == steps and batches == [3, 3, 3]
