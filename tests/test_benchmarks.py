"""The benchmarks' bookkeeping: every provider accounted for, failures turned into rows with
their reason, compiled competitors compiled once per shape, tuning that rejects wrong settings,
and `tinygpt bench` gathering one report. Speed itself is never asserted here."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_attention, bench_layernorm, tune_attention
from benchmarks.report import Timing

CUDA = torch.cuda.is_available()


@pytest.fixture
def instant_timing(monkeypatch):
    """Each case runs three times and 'takes' 1 ms: the bookkeeping without the stopwatch."""
    def fake(fn, grad_to_none=None):
        for _ in range(3):
            fn()
            for t in grad_to_none or ():
                t.grad = None
        return Timing(1.0, 1.0 if CUDA else None)

    for module in (bench_attention, bench_layernorm, tune_attention):
        monkeypatch.setattr(module, "time_ms", fake)


@pytest.mark.slow
def test_bench_as_the_readme_writes_it(tmp_path):
    """`tinygpt bench --quick`, the installed command, from a directory of the user's: every
    suite runs, the report accounts for every provider, and results land in ./bench-results,
    not in the checkout."""
    checkout = Path(__file__).resolve().parents[1]
    tracked = sorted(os.listdir(checkout / "benchmarks" / "results"))
    command = Path(sys.executable).with_name("tinygpt")
    proc = subprocess.run([str(command), "bench", "--quick"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(checkout / "benchmarks" / "results")) == tracked
    tmp_path = tmp_path / "bench-results"
    results = {p.stem.split("-")[0]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == {"attention", "layernorm", "train_step", "generate"}
    expected = {
        "attention": [p.name for p in bench_attention.providers()],
        "layernorm": [p.name for p in bench_layernorm.providers()],
        "train_step": ["reference", "torch", "triton", "reference + compile",
                       "torch + compile", "triton + compile"],
        "generate": [],  # one model, with and without its cache
    }
    report = next(tmp_path.glob("report-*.md")).read_text()
    for name, result in results.items():
        assert list(result["providers"]) == expected[name]
        if name == "generate":
            assert len(result["rows"]) == 3  # shift, exact, off
            continue
        provider_column = result["headers"].index("provider")
        shown = {row[provider_column] for row in result["rows"]}
        for provider, why in result["providers"].items():
            # each provider either has rows, or a reason it has none, in the table and report
            assert (why is None) == (provider in shown), (name, provider)
            line = f"- {provider}: " + ("timed" if why is None else f"not timed here: {why}")
            assert line in report
        for row in result["rows"]:  # a provider that could not run a case says why
            assert row[-1] == "" or len(row[-1]) > len("skipped: "), row
    if not CUDA:
        for name in ("triton", "sdpa (cudnn)", "sdpa (efficient)"):
            assert results["attention"]["providers"][name]
        assert "No goal judged" in report
    assert "suites: kernels, train, generate" in report and "- torch: `" in report
    assert "## attention-" in report and "## train_step-" in report and "## generate-" in report


def test_out_of_memory_in_a_provider_is_a_row_with_its_reason(instant_timing):
    def make(shape):
        def fn(q, k, v, p):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return fn

    greedy = bench_attention.Provider("greedy", make)
    sdpa = next(p for p in bench_attention.providers() if p.name == "sdpa (math)")
    rows = []
    bench_attention.measure("quick", dict(B=1, H=1, T=16, D=16), "float32", 0.0, "fwd+bwd",
                            [greedy, sdpa], rows, {})
    by_name = {row[5]: row for row in rows}
    assert by_name["greedy"][-1] == ("skipped: out of memory (CUDA out of memory. Tried to "
                                     "allocate 9.00 GiB)")
    assert by_name["sdpa (math)"][-1] == "" and by_name["sdpa (math)"][7] == "1.000"


def test_a_provider_without_dropout_says_so(instant_timing):
    flex = bench_attention.Provider("no-dropout", lambda s: None, dropout=False)
    rows = []
    bench_attention.measure("quick", dict(B=1, H=1, T=16, D=16), "float32", 0.2, "fwd", [flex],
                            rows, {})
    assert rows[0][-1] == "skipped: no-dropout has no dropout"


def test_compiled_baseline_compiles_once_per_shape(monkeypatch, instant_timing):
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
                       for t in example_inputs])
        return gm.forward

    monkeypatch.setattr(bench_layernorm, "COMPILE_BACKEND", recording_backend)
    compiled = next(p for p in bench_layernorm.providers() if p.name == "torch.compile")
    # more shapes x modes (10) than Dynamo's recompile limit (8): no fallback to eager either
    shapes = [(3, 8), (5, 16), (7, 24), (9, 32), (11, 40)]
    rows = []
    bench_layernorm.measure("layernorm", shapes, torch.float32, 1.0, [compiled], rows, {})
    assert len(rows) == 10 and all(row[-1] == "" for row in rows)
    assert len(graphs) == 10  # one compile per shape and mode, none reused or repeated
    for (M, N), graph in zip([s for s in shapes for _ in range(2)], graphs):
        assert (M, N) in graph, graph  # static sizes: no symbolic dimension
        assert all(isinstance(t, tuple) for t in graph), graph


def test_tuning_rejects_settings_that_compute_wrongly(monkeypatch):
    kwargs = dict(T=37, dtype=torch.float32, device="cuda" if CUDA else "cpu")
    assert tune_attention.wrong(16, 0.2, **kwargs) is None
    attention = importlib.import_module("tinygpt.kernels.attention").attention
    monkeypatch.setattr(tune_attention, "attention",
                        lambda *a, **k: attention(*a, **k) * 1.01)  # a config 1% off
    assert tune_attention.wrong(16, 0.2, **kwargs).startswith("out off by")


@pytest.mark.parametrize("cudnn_ms, verdict", [(1.1, "MISSED"), (1.3, "met")])
def test_attention_goal_is_judged_against_the_best_sdpa_backend(monkeypatch, cudnn_ms, verdict):
    times = {"triton": 1.0, "sdpa (flash)": 1.5, "sdpa (cudnn)": cudnn_ms,
             "flex_attention (compiled)": 0.9}
    monkeypatch.setattr(bench_attention, "CUDA", True)  # goals are judged on CUDA only
    monkeypatch.setattr(bench_attention, "run_case",
                        lambda provider, *args: (Timing(times[provider.name], None), None))
    found = [bench_attention.Provider(name, lambda s: None) for name in times]
    rows = []
    bench_attention.measure("model", bench_attention.MODEL, "bfloat16", 0.0, "fwd+bwd", found,
                            rows, {})
    triton = next(row for row in rows if row[5] == "triton")
    assert triton[10] == f"{cudnn_ms:.2f}x"  # the best SDPA backend, not flash
    assert triton[11] == "0.90x"  # the best competitor of all: flex
    assert triton[12] == f"1.2x best SDPA: {verdict}"
