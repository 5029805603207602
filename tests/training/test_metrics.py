"""A run's record, OUT_DIR/metrics.jsonl: what it holds, a stopped-and-resumed run's equal to an
uninterrupted one's, and the files it must not use or lose."""

import json
import math
import shutil
import signal

import pytest
import torch

from tinygpt.checkpoint import Writer
from tinygpt.config import from_preset
from tinygpt.errors import UserError
from tinygpt.metrics import NAME, TIMING
from tinygpt.optim import lr_at
from tinygpt.rundir import LOCK_NAME
from tinygpt.train import _Run, train

RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2,
           dropout=0.1, eval_iters=2, warmup_iters=5, max_iters=20, eval_interval=10,
           device="cpu", backend="torch")


def run(out_dir, corpus, resume=False, **kw) -> dict:
    overrides = {"out_dir": str(out_dir)} if resume else {**RUN, "out_dir": str(out_dir), **kw}
    return train("cpu-baby", overrides, data=str(corpus), log_interval=3, resume=resume)


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / NAME).read_text().splitlines()]


def untimed(found: list[dict]) -> list[dict]:
    """The records less what differs between identical runs: timings, and the header's run id,
    moment, command line and output directory."""
    kept = [{k: v for k, v in r.items() if k not in TIMING + ("run", "started", "command")}
            for r in json.loads(json.dumps(found))]
    kept[0]["config"]["train"].pop("out_dir")
    return kept


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_path):
    out = tmp_path_factory.mktemp("full")
    run(out, corpus_path)
    return records(out)


def test_the_record_holds_a_header_then_steps_and_evaluations(uninterrupted, corpus_path):
    header, *rest = uninterrupted
    assert header["kind"] == "header" and len(header["run"]) == 16
    assert header["config"]["train"]["max_iters"] == 20 and header["backend"] == "torch"
    assert header["data"]["sha256"] and header["data"]["tokenizer"] == "chars"
    assert header["versions"]["torch"] and header["command"]
    steps = [r for r in rest if r["kind"] == "step"]
    evals = [r for r in rest if r["kind"] == "eval"]
    assert [r["iter"] for r in steps] == [3, 6, 9, 12, 15, 18, 20]  # every 3rd, and the last
    assert [r["iter"] for r in evals] == [0, 10, 20]
    _, cfg = from_preset("cpu-baby", **RUN)
    for r in steps:
        assert r["lr"]["adamw"] == pytest.approx(lr_at(r["iter"] - 1, cfg))
        assert r["lr"]["muon"] == pytest.approx(lr_at(r["iter"] - 1, cfg) * cfg.muon_lr / cfg.lr)
        assert r["grad_norm"] > 0 and r["clipped"] == (r["grad_norm"] > cfg.grad_clip)
        assert math.isfinite(r["loss"]) and r["threads"] >= 1
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in steps[1:])
    for r in evals:
        assert r["val_bits"] == pytest.approx(r["val"] / math.log(2))
        assert r["best_val"] <= r["val"] and r["saved"][-1] == "last.pt"
    assert [r["elapsed"] for r in rest] == sorted(r["elapsed"] for r in rest)


def test_a_stopped_and_resumed_run_records_what_an_uninterrupted_one_does(
        tmp_path, corpus_path, uninterrupted, monkeypatch):
    """SIGTERM in step 14: last.pt at 13, and the resumed run goes on in the same file."""
    step = _Run.step

    def stopping(self, it):
        if it == 13:
            signal.raise_signal(signal.SIGTERM)  # answered between two layers of this step
        return step(self, it)

    monkeypatch.setattr(_Run, "step", stopping)
    assert run(tmp_path, corpus_path)["iterations"] == 13
    assert [r["iter"] for r in records(tmp_path)[1:]] == [0, 3, 6, 9, 10, 12]
    monkeypatch.undo()
    run(tmp_path, corpus_path, resume=True)
    assert untimed(records(tmp_path)) == untimed(uninterrupted)


def test_records_past_the_checkpoint_and_a_line_cut_short_are_dropped_on_resume(
        tmp_path, corpus_path, uninterrupted, monkeypatch, capsys):
    """A run that died in step 17 (kill -9, a power cut) with its last checkpoint from step 10
    left records up to 15 and half a line: resuming drops both, a line each, and ends with the
    uninterrupted run's records."""
    save = Writer.save

    def keeping(self, name, payload):
        save(self, name, payload)
        if name == "last.pt" and payload["iteration"] == 10:
            shutil.copy(self.out_dir / name, self.out_dir / "last-10.pt")

    monkeypatch.setattr(Writer, "save", keeping)
    run(tmp_path, corpus_path)
    monkeypatch.undo()
    (tmp_path / "last-10.pt").replace(tmp_path / "last.pt")
    lines = [line for line in (tmp_path / NAME).read_text().splitlines(keepends=True)
             if json.loads(line).get("iter", 0) <= 15]
    (tmp_path / NAME).write_text("".join(lines) + '{"kind":"step","it')
    capsys.readouterr()
    run(tmp_path, corpus_path, resume=True)
    err = capsys.readouterr().err
    assert "metrics.jsonl ends in a line cut short (18 bytes); dropping it" in err
    assert "metrics.jsonl: dropped 2 records past iteration 10, where this run resumes" in err
    assert untimed(records(tmp_path)) == untimed(uninterrupted)


def test_another_runs_record_is_refused_on_resume_and_left_as_it_was(tmp_path, corpus_path):
    run(tmp_path, corpus_path, max_iters=4, eval_interval=2)
    other = tmp_path / "other"
    run(other, corpus_path, max_iters=2, eval_interval=2)
    shutil.copy(other / NAME, tmp_path / NAME)
    before = run_files(tmp_path)
    with pytest.raises(UserError, match=r"metrics.jsonl is the record of another run"):
        run(tmp_path, corpus_path, resume=True)
    assert run_files(tmp_path) == before


def run_files(out_dir):
    """The files a run keeps, by name, but the lock, which names each run's start time."""
    return {p.name: p.read_bytes() for p in out_dir.iterdir()
            if p.is_file() and p.name != LOCK_NAME}


def test_a_broken_line_is_refused_naming_it(tmp_path, corpus_path):
    run(tmp_path, corpus_path, max_iters=4, eval_interval=2)
    lines = (tmp_path / NAME).read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    (tmp_path / NAME).write_text("".join(lines))
    with pytest.raises(UserError, match=r"metrics.jsonl line 3 is not a record"):
        run(tmp_path, corpus_path, resume=True)


def test_a_new_run_keeps_no_record_before_its_first_checkpoint_and_replaces_only_with_overwrite(
        tmp_path, corpus_path):
    run(tmp_path, corpus_path, max_iters=2, eval_interval=2)
    (tmp_path / "last.pt").unlink()
    (tmp_path / "best.pt").unlink()
    with pytest.raises(UserError, match=r"already holds a run \(metrics.jsonl\)"):
        run(tmp_path, corpus_path, max_iters=2, eval_interval=2)
    first = records(tmp_path)[0]["run"]
    train("cpu-baby", {**RUN, "out_dir": str(tmp_path), "max_iters": 2, "eval_interval": 2},
          data=str(corpus_path), overwrite=True, log_interval=3)
    assert records(tmp_path)[0]["run"] != first
    assert sum(r["kind"] == "header" for r in records(tmp_path)) == 1


def test_recording_off_writes_no_record(tmp_path, corpus_path):
    train("cpu-baby", {**RUN, "out_dir": str(tmp_path), "max_iters": 2, "eval_interval": 2},
          data=str(corpus_path), record=False)
    assert not (tmp_path / NAME).exists() and (tmp_path / "last.pt").exists()


def test_recording_changes_nothing_the_run_computes(tmp_path, corpus_path):
    """Without clipping, a step record computes the gradient norm itself: the weights are those
    of a run without a record, bit for bit."""
    weights = []
    for record in (True, False):
        out = tmp_path / str(record)
        summary = train("cpu-baby", {**RUN, "out_dir": str(out), "max_iters": 4, "grad_clip": 0.0},
                        data=str(corpus_path), log_interval=1, record=record)
        weights.append({k: v.clone() for k, v in summary["model"].state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    steps = [r for r in records(tmp_path / "True") if r["kind"] == "step"]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["clipped"] is False for r in steps)
