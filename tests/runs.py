"""The small runs the tests drive: a tiny training run, the command line with its output
captured, and the shape of a one-line error. (tests/ is on sys.path beside conftest.py.)"""

from tinygpt.cli import main
from tinygpt.train import train

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0,
            eval_iters=4, warmup_iters=10, lr=3e-3, device="cpu", backend="torch")


def tiny_run(tmp_path, corpus, **kw):
    overrides = {**TINY, "out_dir": str(tmp_path / "out"), **kw}
    return train("cpu-baby", overrides, data=str(corpus), log_interval=1000)


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what earlier steps printed
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, needle):
    """`tinygpt` exited with status 2 and one line, `tinygpt: error: ...` holding `needle`."""
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygpt: error:") and needle in lines[0], err
