"""`tinygpt plot`: the runs' curves from their records, labelled by what differs between them;
what is whole of a damaged record plotted, the rest said."""

import json

import pytest
from runs import one_line_error, run_cli

from tinygpt.plot import Run, labels

pytest.importorskip("matplotlib")


def record(out_dir, run, lr, evals, tail=""):
    out_dir.mkdir(parents=True)
    lines = [{"kind": "header", "run": run, "config": {"model": {"n_layer": 4}, "train": {
        "lr": lr, "optimizer": "adamw", "out_dir": str(out_dir), "device": "cpu"}}}]
    lines += [{"kind": "eval", "iter": it, "train": loss + 0.05, "val": loss, "elapsed": it / 10}
              for it, loss in evals]
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)


def test_labels_name_the_settings_that_differ():
    runs = [Run(name, {"config": {"model": {"n_layer": 4}, "train": {"lr": lr, "out_dir": name}}},
                []) for name, lr in (("a", 1e-3), ("b", 3e-3))]
    assert labels(runs) == ["a (lr 0.001)", "b (lr 0.003)"]
    assert labels(runs[:1]) == ["a"]


def test_two_runs_are_drawn_and_a_damaged_record_plots_what_is_whole(tmp_path, capsys):
    record(tmp_path / "adamw", "r1", 1e-3, [(0, 4.2), (10, 3.0), (20, 2.5)])
    record(tmp_path / "muon", "r2", 3e-3, [(0, 4.2), (10, 2.8)],
           tail='{not json}\n{"kind": "eval", "it')  # a corrupt line and one cut short
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    out = tmp_path / "runs.svg"
    rc, text, err = run_cli(capsys, "plot", str(tmp_path / "adamw"), str(tmp_path / "muon"),
                            str(tmp_path / "empty"), str(tmp_path / "none"), "-o", str(out))
    assert rc == 0 and text == f"wrote {out}\n"
    svg = out.read_text()
    assert "adamw (lr 0.001)</text>" in svg and "muon (lr 0.003)</text>" in svg
    assert "step</text>" in svg and "wall-clock seconds</text>" in svg
    said = err.splitlines()
    assert any("muon/metrics.jsonl: skipped 2 lines that are not records (4, 5)" in line
               for line in said), err
    assert any("empty/metrics.jsonl: no evaluations to plot; left out" in line for line in said)
    assert any("none: no run's record there" in line for line in said)
    rc, _, _ = run_cli(capsys, "plot", str(tmp_path / "adamw"), "-o", str(tmp_path / "a.png"))
    assert rc == 0 and (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_to_plot_or_a_bad_file_name_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    rc, _, err = run_cli(capsys, "plot", str(tmp_path / "run"))
    one_line_error(rc, err.splitlines()[-1], "nothing to plot: no evaluations in")
    record(tmp_path / "ok", "r", 1e-3, [(0, 4.2)])
    rc, _, err = run_cli(capsys, "plot", str(tmp_path / "ok"), "-o", str(tmp_path / "x.txt"))
    one_line_error(rc, err, "name a .png, .svg or .pdf file")
