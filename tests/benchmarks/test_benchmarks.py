"""The benchmarks' bookkeeping: every provider accounted for, failures turned into rows with
their reason, compiled competitors compiled once per shape, tuning that rejects wrong settings,
and `tinygpt bench` gathering one report. Speed itself is never asserted here."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_attention, bench_layernorm, bench_quality, bench_train
from benchmarks.report import Timing, table_line
from benchmarks.tools import tune_attention
from tinygpt import optim

CUDA = torch.cuda.is_available()

ROOT = Path(__file__).resolve().parents[2]  # the checkout


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
def test_bench_as_the_readme_writes_it(tmp_path, run_command):
    """`tinygpt bench --quick`, the installed command, from a directory of the user's: every
    suite runs, the report accounts for every provider, and results land in ./bench-results,
    not in the checkout."""
    checkout = ROOT
    tracked = sorted(os.listdir(checkout / "benchmarks" / "results"))
    command = Path(sys.executable).with_name("tinygpt")
    proc = run_command([str(command), "bench", "--quick"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(checkout / "benchmarks" / "results")) == tracked
    tmp_path = tmp_path / "bench-results"
    results = {p.stem.split("-")[0]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == {"attention", "layernorm", "train_step", "generate"}
    expected = {
        "attention": [p.name for p in bench_attention.providers()],
        "layernorm": [p.name for p in bench_layernorm.providers()],
        "train_step": ["reference", "torch", "triton", "torch + compile", "triton + compile",
                       "reference + compile"],
        "generate": [],  # one model, with and without its cache
    }
    report = next(tmp_path.glob("report-*.md")).read_text()
    for name, result in results.items():
        # each table is shown once, as it is measured: its header and every row a line of it
        assert proc.stdout.count(table_line(result["headers"])) == 1, proc.stdout
        for row in result["rows"]:
            assert proc.stdout.count(table_line(row)) == 1, (name, row)
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
    from tinygpt.kernels.flash_attention import attention
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


def test_case_groups_pick_each_case_once(monkeypatch):
    """--cases on CUDA: goals is the sweep's two TFLOP/s goal cases, judged as sweep rows; every
    group together is the default set, each case once; LayerNorm's groups split its shapes."""
    monkeypatch.setattr(bench_attention, "CUDA", True)
    goals = bench_attention.cases(False, ["goals"])
    assert [(label, s["D"], s["T"]) for label, s, _ in goals] == [("sweep", 64, 8192),
                                                                 ("sweep", 128, 16384)]
    every = bench_attention.cases(False, bench_attention.CASE_GROUPS)
    assert len(every) == 16 and sorted(map(str, every)) == sorted(map(str, bench_attention.cases(
        False)))
    assert bench_attention.cases(False, ["model"])[1] == ("model, dropout", bench_attention.MODEL,
                                                          bench_attention.TRAINING_DROPOUT)
    bf16 = torch.bfloat16
    found = [(case, shape, dtype) for case, shapes, dtype in bench_layernorm.cases(
        bench_layernorm.CASE_GROUPS, bf16) for shape in shapes]
    model = bench_layernorm.MODEL_SHAPE
    assert sorted(map(str, found)) == sorted(map(str, (
        [("add+layernorm", s, bf16) for s in [model, *bench_layernorm.ADD_SWEEP]]
        + [("layernorm", model, torch.float32)]
        + [("layernorm", s, bf16) for s in [model, *bench_layernorm.SWEEP]])))
    assert [shapes for _, shapes, _ in bench_layernorm.cases(["bandwidth"], bf16)] == [
        [bench_layernorm.BANDWIDTH_SHAPE]] * 2
    assert len(bench_layernorm.cases(["model"], torch.float32)) == 2  # fp32 LayerNorm once


def test_an_interrupted_benchmark_writes_what_it_measured(monkeypatch, tmp_path):
    """Ctrl-C (or gpu_suite.sh's deadline) during the second row: the first is written, marked
    partial in the table and the gathered report, and the script exits 130."""
    from benchmarks import bench_train
    from benchmarks.report import INTERRUPTED, gather

    made = []

    def make_step(preset, backend, compiled):
        made.append(backend)
        if len(made) == 2:
            raise KeyboardInterrupt
        return lambda: None, 1000, 1e9

    monkeypatch.setattr(bench_train, "make_step", make_step)
    with pytest.raises(SystemExit) as stop:
        bench_train.main(["--quick", "--out", str(tmp_path)])
    assert stop.value.code == 130 and made == ["reference", "torch"]
    (result,) = tmp_path.glob("train_step-*.json")
    written = json.loads(result.read_text())
    assert written["interrupted"] and written["notes"].startswith(f"**{INTERRUPTED}**")
    assert [row[0] for row in written["rows"]] == ["reference"]
    assert INTERRUPTED in result.with_suffix(".md").read_text()
    report = gather([result], tmp_path, "", []).read_text()
    assert f"- **interrupted, partial**: {result.stem}" in report


def test_a_report_is_named_for_the_device_its_results_came_from(tmp_path):
    """Results from the GPU machine gathered on a CPU one: report-cuda-DATE.md, not -cpu-."""
    from benchmarks.report import environment, gather, write_report

    env = environment() | {"date": "2026-12-02 10:00 UTC", "device": "NVIDIA H200"}
    written = write_report(str(tmp_path), "tune-attention", "t", ["case"], [["one"]], env)
    cuda = written.with_name("tune-attention-cuda-2026-12-02.json")
    written.with_suffix(".json").rename(cuda)
    report = gather([cuda], tmp_path, "", [])
    assert report.name == "report-cuda-2026-12-02.md"
    assert "# tinygpt benchmark report: NVIDIA H200" in report.read_text()


def test_ctrl_c_ends_tinygpt_bench_after_the_script_it_reached(monkeypatch, tmp_path):
    """The terminal's SIGINT reaches `tinygpt bench` and its script alike: the script writes a
    partial table and exits 130, the command gathers the report and starts no further script."""
    import signal

    from benchmarks.report import environment, write_report
    from tinygpt import bench

    started = []

    def call(command, cwd):
        started.append(command[2])
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, here too
        out = command[command.index("--out") + 1]
        write_report(out, "layernorm", "partial", ["case"], [["one"]], environment(),
                     interrupted=True)
        return 130

    monkeypatch.setattr(bench.subprocess, "call", call)
    handler = signal.getsignal(signal.SIGINT)
    report, interrupted = bench.run_benchmarks(["kernels", "train"], str(tmp_path))
    assert interrupted and started == ["benchmarks.bench_layernorm"]
    assert signal.getsignal(signal.SIGINT) is handler
    assert "**interrupted, partial**: layernorm-" in report.read_text()


SUITE = ROOT / "benchmarks" / "tools" / "gpu_suite.sh"


def stand_in_python(tmp_path, pytest_seconds: float = 0.0) -> Path:
    """A python for gpu_suite.sh that needs no GPU: it appends each command line it is given to
    calls.jsonl, answers `-c` at once, and runs pytest for `pytest_seconds` (SIGINT ends it,
    printing 'pytest interrupted') and every module else at once."""
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\n"
                      "import json, sys, time\n"
                      f"with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as log:\n"
                      "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      "if 'pytest' in sys.argv:\n"
                      "    try:\n"
                      f"        time.sleep({pytest_seconds})\n"
                      "    except KeyboardInterrupt:\n"
                      "        print('pytest interrupted'); sys.exit(130)\n")
    python.chmod(0o755)
    return python


def modules_run(tmp_path) -> dict[str, list[str]]:
    """`-m MODULE` -> its arguments, of every call the stand-in python logged."""
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return {c[1]: c[2:] for c in calls if c[0] == "-m"}


def test_gpu_suite_keeps_its_deadline(tmp_path, run_command):
    """A stage still running at DEADLINE - MARGIN gets SIGINT, later stages do not start, and the
    archive and summary are written all the same."""
    python = stand_in_python(tmp_path, pytest_seconds=60)
    env = dict(os.environ, PYTHON=str(python), OUT=str(tmp_path / "out"), DEADLINE="4",
               MARGIN="1")
    proc = run_command(["bash", str(SUITE), "tests", "train"], env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "=== tests: stopped at DEADLINE=4 (SIGINT: what it measured is kept)" in summary
    assert "STOPPED (deadline or cap): tests" in summary
    assert "=== bench_train: not run" in summary
    assert "NOT RUN (no time left): bench_train" in summary
    archive = tmp_path / "out" / "gpu_suite-tests-train.tgz"
    listing = subprocess.run(["tar", "-xzOf", str(archive), "./tests.log"], capture_output=True,
                             text=True, check=True).stdout
    assert "pytest interrupted" in listing
    env["DEADLINE"] = "9m"
    proc = run_command(["bash", str(SUITE), "tests"], env=env, timeout=60)
    assert proc.returncode == 2 and "DEADLINE must be whole seconds, got '9m'" in proc.stderr


def test_gpu_suite_caps_a_stage_and_goes_on(tmp_path, run_command):
    """tests:2 stops the tests after 2 s (the deadline is far off), and the stages after it still
    run; the archive is named by the stages without their caps."""
    python = stand_in_python(tmp_path, pytest_seconds=60)
    env = dict(os.environ, PYTHON=str(python), OUT=str(tmp_path / "out"), DEADLINE="300")
    proc = run_command(["bash", str(SUITE), "train", "tests:2"], env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "=== tests: stopped at its cap of 2 s (SIGINT: what it measured is kept)" in summary
    assert "=== bench_train: exit 0" in summary
    assert "STOPPED (deadline or cap): tests" in summary and "NOT RUN" not in summary
    assert (tmp_path / "out" / "gpu_suite-train-tests.tgz").is_file()


def test_gpu_suite_first_light_plan(tmp_path, run_command):
    """first-light runs `tinygpt doctor`, then the tests, kernels' tests first and every test
    file once, then the kernel benchmarks on their goal cases, the training-step benchmark and
    the quality run, and nothing else."""
    python = stand_in_python(tmp_path)
    env = dict(os.environ, PYTHON=str(python), OUT=str(tmp_path / "out"))
    env.pop("ATTENTION_CASES", None)
    env.pop("LAYERNORM_CASES", None)
    proc = run_command(["bash", str(SUITE), "first-light"], env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = modules_run(tmp_path)
    assert list(run) == ["tinygpt", "pytest", "benchmarks.bench_layernorm",
                         "benchmarks.bench_attention", "benchmarks.bench_train",
                         "benchmarks.bench_quality"]
    assert run["tinygpt"][0] == "doctor" and run["tinygpt"][1] == "--json"
    files = [a for a in run["pytest"] if a.startswith("tests/")]
    assert files[:2] == ["tests/kernels/test_attention.py", "tests/kernels/test_layernorm.py"]
    every = sorted(str(f.relative_to(ROOT)) for f in ROOT.glob("tests/**/test_*.py"))
    assert sorted(files) == every
    assert run["benchmarks.bench_layernorm"][:3] == ["--cases", "model", "bandwidth"]
    assert run["benchmarks.bench_attention"][:3] == ["--cases", "model", "goals"]
    assert (tmp_path / "out" / "gpu_suite-first-light.tgz").is_file()


@pytest.mark.parametrize("stage, error", [
    ("test", "unknown stage 'test'"),
    ("kernels:60", "'kernels:60': a cap is one stage's whole seconds"),
    ("tests:2m", "'tests:2m': a cap is one stage's whole seconds"),
    ("tests:0", "'tests:0': a cap is one stage's whole seconds"),  # timeout 0 would not stop it
])
def test_gpu_suite_refuses_a_stage_it_does_not_know(tmp_path, run_command, stage, error):
    env = dict(os.environ, PYTHON=str(stand_in_python(tmp_path)), OUT=str(tmp_path / "out"))
    proc = run_command(["bash", str(SUITE), "tests", stage], env=env, timeout=60)
    assert proc.returncode == 2 and error in proc.stderr, proc.stderr
    assert not (tmp_path / "calls.jsonl").exists()  # nothing ran


@pytest.mark.slow
@pytest.mark.corpus
def test_the_load_table_reads_what_tinygpt_prints(tmp_path, corpus_path):
    """`bench_train --load` on tinygpt's own output, with a core kept busy: step times from
    steps `first` on, the final val loss, the sampling rate; the busy process is gone after."""
    from benchmarks import load

    train = load.train_run(tmp_path / "out", ["--threads", "1", "--eval-iters", "2"], {}, True,
                           8, 3, str(corpus_path))
    assert 0 < train["median"] < 1000 and 0 < train["mean"] < 1000
    assert float(train["val"]) < 5
    rate = load.sample_run(tmp_path / "out" / "last.pt", [], {"OMP_WAIT_POLICY": "PASSIVE"},
                           True, 20)
    assert rate > 0
    with load.BusyCore() as busy:
        assert busy.proc.poll() is None
    assert busy.proc.poll() is not None
    verdicts = load._verdicts({
        load.DEFAULT: {"idle": {"mean": 25.0, "chars/s": 1000.0, "val": "2.4"},
                       "busy": {"mean": 50.0, "chars/s": 900.0, "val": "2.4"}},
        "--threads 1": {"idle": {"mean": 40.0, "chars/s": 990.0, "val": "2.4"},
                        "busy": {"mean": 40.0, "chars/s": 1000.0, "val": "2.4"}},
    }, 200, 20, 3)
    assert "idle: training 0.62x the time of the best fixed setting (--threads 1), sampling " \
           "0.99x (--threads 1); goal at most 1.05x: met" in verdicts
    assert "busy: training 1.25x the time of the best fixed setting (--threads 1), sampling " \
           "1.11x (--threads 1); goal at most 1.15x: MISSED" in verdicts
    assert "val loss: the same in every run" in verdicts


def _run(seed: int, vals: list[float], steps: int = 4) -> dict:
    """A sweep run evaluated every 2 steps with val losses `vals`."""
    history = [{"iter": 2 * i, "train": v, "val": v} for i, v in enumerate(vals)]
    return {"seed": seed, "steps": steps, "history": history, "tokens_per_step": 1000}


def test_the_sweep_refuses_results_that_do_not_hold_together():
    good = {"a": [_run(1, [4.0, 3.0, 2.0]), _run(2, [4.0, 3.0, 2.5])]}
    bench_quality.check_sweep(good, [1, 2], 4)
    broken = {
        "a seed missing": ({"a": good["a"][:1]}, "a: 1 runs for 2 seeds"),
        "a run cut short": ({"a": [good["a"][0], _run(2, [4.0, 3.0], steps=2)]},
                            "a seed 2: ran 2 steps, evaluated at [0, 2]"),
        "a diverged run": ({"a": [good["a"][0], _run(2, [4.0, float("nan"), 2.0])]},
                           "a seed 2: a loss is not finite"),
    }
    for results, needle in broken.values():
        with pytest.raises(SystemExit, match=re.escape(needle)):
            bench_quality.check_sweep(results, [1, 2], 4)


def test_a_sweep_crosses_rates_iterations_and_varied_fields():
    """Each Muon rate with each iteration count, every config at every combination of the
    --vary values; configs that differ only in what a step computes share a step timing."""
    args = argparse.Namespace(adamw=[1e-3], muon=[0.02], ns_steps=[5, 3], lr=3e-3,
                              vary=[["batch_size", "12", "24"], ["warmup_iters", "100", "25"]])
    configs = bench_quality.sweep_configs(args)
    assert len(configs) == 4 + 2 * 4
    muon = next(c for c in configs if c.optimizer == "muon" and c.ns_steps == 3
                and dict(c.varied) == {"batch_size": 24, "warmup_iters": 25})
    assert muon.label == ("muon 0.02, 3 iterations (+ adamw 0.003), batch_size 24, "
                          "warmup_iters 25")
    assert muon.overrides() == {"optimizer": "muon", "lr": 3e-3, "muon_lr": 0.02,
                                "muon_ns_steps": 3, "batch_size": 24, "warmup_iters": 25}
    assert len({c.step_label for c in configs}) == 2 + 2 * 2  # warm-up costs no time
    assert muon.step_label == "muon, 3 iterations, batch_size 24"


def test_the_sweep_table_counts_steps_to_the_target_per_seed():
    results = {"fast": [_run(1, [4.0, 1.8, 1.7]), _run(2, [4.0, 2.2, 1.9])],
               "slow": [_run(1, [4.0, 2.5, 2.1]), _run(2, [4.0, 2.5, 1.95])]}
    ms = {"": {"fast": 20.0, "slow": 10.0}, "AVX2 only": {"fast": 40.0, "slow": 12.5}}
    headers, rows = bench_quality.sweep_table(results, 2.0, ms, [2, 4])
    assert headers[2:] == ["val @ 2", "val @ 4", "steps to 2.0000 (each seed)", "ms/step",
                           "tok/s", "s to target", "ms/step (AVX2 only)", "tok/s (AVX2 only)",
                           "s to target (AVX2 only)"]
    assert rows[0] == ["fast", "2", "2.0000 ± 0.2828", "1.8000 ± 0.1414", "3 (2, 4)", "20.00",
                       "50,000", "0.1", "40.00", "25,000", "0.1"]
    assert rows[1][4:] == ["not all reached (-, 4)", "10.00", "100,000", "-", "12.50", "80,000",
                           "-"]


@pytest.mark.slow
def test_a_sweep_writes_its_table_and_curves(tmp_path, small_text_file, run_command):
    """The sweep entry end to end on a tiny model: a row a config, the target taken from
    AdamW at 1e-3, ms/step for both optimizers, and the loss curves."""
    tiny = ["--set", "n_layer", "1", "--set", "n_head", "2", "--set", "n_embd", "16",
            "--set", "block_size", "16", "--set", "batch_size", "4", "--set", "eval_iters", "2"]
    proc = run_command([sys.executable, "-m", "benchmarks.bench_quality", "--sweep", "--steps",
                        "6", "--evals", "3", "--adamw", "1e-3", "--muon", "0.02", "--seeds", "1",
                        "2", "--jobs", "2", "--data", str(small_text_file), "--out",
                        str(tmp_path), *tiny], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("] adamw 0.001 seed ") == 2
    (report,) = tmp_path.glob("cpu-baby-sweep-*.json")
    table = json.loads(report.read_text())
    assert [row[0] for row in table["rows"]] == ["adamw 0.001", "muon 0.02 (+ adamw 0.001)"]
    assert table["headers"][2:4] == ["val @ 2", "val @ 4"] and "val @ 6" in table["headers"]
    assert all(float(row[-3]) > 0 for row in table["rows"])  # ms/step of each optimizer
    assert "- target: " in table["notes"] and "mean final val loss of adamw 0.001" in table["notes"]
    svg = report.with_suffix(".svg").read_text()
    assert "adamw 0.001</text>" in svg and "muon 0.02 (+ adamw 0.001)</text>" in svg


@pytest.mark.slow
def test_a_single_run_scores_its_best_checkpoint_on_the_whole_val_split(
        tmp_path, small_text_file, run_command):
    tiny = ["--set", "n_layer", "1", "--set", "n_head", "2", "--set", "n_embd", "16",
            "--set", "block_size", "16", "--set", "batch_size", "4", "--set", "eval_iters", "2",
            "--set", "max_iters", "4", "--set", "eval_interval", "2"]
    proc = run_command([sys.executable, "-m", "benchmarks.bench_quality", "--data",
                        str(small_text_file), "--out", str(tmp_path), *tiny], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (report,) = tmp_path.glob("cpu-baby-train-*.json")
    notes = json.loads(report.read_text())["notes"]
    val = 20_000 - int(0.9 * 20_000)
    assert re.search(r"- best.pt on the whole val split \(`tinygpt eval`\): val: loss \d\.\d{4}, "
                     rf"\d\.\d{{4}} bits per character \({val - 1:,} characters scored in "
                     r"windows of 16, ", notes), notes


def test_the_optimizer_rows_step_with_the_optimizers_they_name(monkeypatch):
    """bench_train --optimizers: AdamW, tinygpt's Muon in the precision this machine picks and
    in the other, and torch.optim.Muon in its place, each timed, with the optimizer's share
    inside the step's."""
    stepped = []
    for cls in (optim.Muon, torch.optim.Muon, torch.optim.AdamW):
        monkeypatch.setattr(cls, "step", lambda self, *a, f=cls.step, **k: stepped.append(
            getattr(self, "precision", type(self))) or f(self, *a, **k))
    tiny = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2)
    cpu = torch.device("cpu")
    rows = {label: ({**tiny, **overrides}, swap)
            for label, (overrides, swap) in bench_train.optimizer_rows(cpu).items()}
    times = bench_train.optimizer_steps("cpu-baby", rows, rounds=1, steps=1, device=cpu)
    chosen = optim.newton_schulz_precision(cpu)
    other = "fp32" if chosen.dtype == torch.bfloat16 else "bf16"
    assert list(times) == ["adamw", "muon", f"muon, Newton-Schulz in {other}",
                           "torch.optim.Muon"]
    assert all(0 < opt[0] < step[0] for step, opt in times.values())
    assert stepped.count(torch.optim.Muon) == 2  # the warm-up round and the timed one
    assert stepped.count(torch.optim.AdamW) == 8
    forced = {"bf16": torch.bfloat16, "fp32": torch.float32}[other]
    assert [p for p in stepped if isinstance(p, optim.Precision)] == [  # round by round
        chosen, optim.Precision(forced, None, "asked for")] * 2


def test_rows_time_as_another_cpu_in_a_child_process(tmp_path, monkeypatch):
    """optimizer_steps_as times the rows in a fresh process whose environment has the limits
    (so that oneDNN and MKL read them when they start), at this process's thread count."""
    tiny = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2)
    rows = {"adamw": ({**tiny, "optimizer": "adamw"}, None),
            "muon": ({**tiny, "optimizer": "muon"}, None)}
    seen = {}
    real = subprocess.run

    def run(command, env, check):
        seen.update(env=env, command=command)
        return real(command, env=env, check=check)

    monkeypatch.setattr(bench_train.subprocess, "run", run)
    times = bench_train.optimizer_steps_as({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "cpu-baby", rows,
                                           rounds=2, steps=1)
    assert list(times) == ["adamw", "muon"] and all(len(t[0]) == 2 for t in times.values())
    assert seen["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert seen["command"][1:4] == ["-m", "benchmarks.bench_train", "--time-rows"]
