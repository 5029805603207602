"""`--log tensorboard` and `--log wandb`: the record's every scalar, read back with each tool's own
reader (W&B in its offline mode), and every problem with one a single line before training."""

import glob
import importlib.util
import json
import shutil
import struct

import pytest
from runs import one_line_error, run_cli

from tinygpt.checkpoint import Writer
from tinygpt.loggers import scalars
from tinygpt.metrics import NAME
from tinygpt.train import train

RUN = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2,
           max_iters=6, eval_interval=3, device="cpu", backend="torch")


def expected(out_dir) -> dict[str, dict[int, float]]:
    """Scalar name -> step -> value, from metrics.jsonl."""
    found: dict[str, dict[int, float]] = {}
    for line in (out_dir / NAME).read_text().splitlines():
        record = json.loads(line)
        for name, value in scalars(record).items():
            found.setdefault(name, {})[record["iter"]] = value
    return found


def run(out_dir, corpus, log, resume=False, **kw):
    overrides = {"out_dir": str(out_dir)} if resume else {**RUN, "out_dir": str(out_dir), **kw}
    return train("cpu-baby", overrides, data=str(corpus), log_interval=2, log=log,
                 resume=resume)


def test_tensorboard_holds_every_scalar_of_the_record_and_resumes_without_repeats(
        tmp_path, small_text_file, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = Writer.save

    def keeping(self, name, payload):  # last.pt from step 3, as a run that died after it
        save(self, name, payload)
        if name == "last.pt" and payload["iteration"] == 3:
            shutil.copy(self.out_dir / name, self.out_dir / "last-3.pt")

    monkeypatch.setattr(Writer, "save", keeping)
    run(tmp_path, small_text_file, ["tensorboard"])
    monkeypatch.undo()
    (tmp_path / "last-3.pt").replace(tmp_path / "last.pt")
    run(tmp_path, small_text_file, ["tensorboard"], resume=True)  # steps 4 to 6 again
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    record = expected(tmp_path)
    assert "train/loss" in record and "eval/val_bits" in record and "lr/muon" in record
    assert set(events.Tags()["scalars"]) == set(record)
    for name, values in record.items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == sorted(values), name  # each step once
        assert all(v == pytest.approx(values[s], rel=1e-6) for s, v in got), name
    assert "config/text_summary" in events.Tags()["tensors"]


def read_wandb(path) -> list[dict]:
    """The history rows of a .wandb file: a LevelDB-style log (a 7-byte header, then 32 KiB
    blocks of records: CRC32C, length, type, data) of W&B's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    pos, datas, partial = 7, [], b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the block's padding
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # whole, or the last piece
            datas.append(partial + data if kind == 4 else data)
        else:  # the first or a middle piece
            partial = data if kind == 2 else partial + data
    rows = []
    for data in datas:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_holds_every_scalar_of_the_record(tmp_path, small_text_file, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run's dir wins
    run(tmp_path, small_text_file, ["wandb"])
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = {row["_step"]: row for row in read_wandb(path)}
    record = expected(tmp_path)
    for name, values in record.items():
        for step, value in values.items():
            assert rows[step][name] == pytest.approx(value, rel=1e-9), (name, step)
    run_id = json.loads((tmp_path / NAME).read_text().splitlines()[0])["run"]
    assert path.endswith(f"run-{run_id}.wandb")


def test_a_missing_package_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    rc, _, err = run_cli(capsys, "train", "--out-dir", str(tmp_path / "out"), "--log",
                         "tensorboard")
    one_line_error(rc, err, "--log tensorboard needs the tensorboard package: pip install "
                   "'tinygpt[tensorboard]'")
    assert not (tmp_path / "out").exists()


def test_wandb_without_a_login_is_one_line_and_nothing_trained(tmp_path, small_text_file,
                                                               monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no entry for api.wandb.ai
    (tmp_path / "netrc").write_text("machine example.com login me password secret\n")
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(small_text_file),
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"), "--log", "wandb")
    one_line_error(rc, err.splitlines()[-1], "not logged in to Weights & Biases")
    assert not list((tmp_path / "out").glob("*.pt")) and not (tmp_path / "out" / NAME).exists()


def test_an_unwritable_tensorboard_directory_is_one_line(tmp_path, small_text_file, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tensorboard").write_text("a file where the directory goes")
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(small_text_file),
                         "--device", "cpu", "--out-dir", str(out), "--log", "tensorboard")
    one_line_error(rc, err.splitlines()[-1], f"--log tensorboard cannot write {out}/tensorboard")
    assert not list(out.glob("*.pt"))
