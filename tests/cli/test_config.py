"""Every config field checked in one place: on the command line (one line, before torch is
imported), through the Python API, and in the checkpoints that are loaded."""

import json
import os
import re
import sys

import pytest
import torch

import tinygpt
from tinygpt import cli
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import main
from tinygpt.config import SEED_LIMIT, ModelConfig, SampleConfig, TrainConfig, from_preset
from tinygpt.errors import UserError
from tinygpt.generate import generate
from tinygpt.model import build_model
from tinygpt.threads import usable_cores

# Each is refused in one line naming the problem, with exit status 2 and nothing written.
BAD_ARGUMENTS = {
    "lr nan": (["train", "--lr", "nan"], "lr must be a finite number, got nan"),
    "split summing to 1.1": (["train", "--split", "0.9,0.2"],
                             "--split 0.9,0.2: give train,val or train,val,test as fractions"),
    "split of one part": (["train", "--split", "90M"], "--split 90M: give train,val"),
    "split with no val": (["train", "--split", "1,0"], "the train and val parts must not be empty"),
    "tokenizer unknown": (["train", "--tokenizer", "words"], "--tokenizer"),
    "lr negative": (["train", "--lr", "-1"], "lr must be positive, got -1.0"),
    "min_lr nan": (["train", "--min-lr", "nan"], "min_lr must be a finite number"),
    "min_lr above lr": (["train", "--preset", "cpu-baby", "--min-lr", "0.01"],
                        "min_lr (0.01) must not exceed lr (0.003)"),
    "beta1 1.5": (["train", "--beta1", "1.5"], "beta1 must be in [0, 1), got 1.5"),
    "beta2 inf": (["train", "--beta2", "inf"], "beta2 must be a finite number, got inf"),
    "weight decay negative": (["train", "--weight-decay", "-0.1"],
                              "weight_decay must be at least 0, got -0.1"),
    "grad clip negative": (["train", "--grad-clip", "-1"], "grad_clip must be at least 0"),
    "warm-up negative": (["train", "--warmup-iters", "-5"], "warmup_iters must be at least 0"),
    "decay negative": (["train", "--lr-decay-iters", "-1"], "lr_decay_iters must be at least 0"),
    "dropout 1": (["train", "--dropout", "1"], "dropout must be in [0, 1), got 1.0"),
    "seed past 64 bits": (["train", "--seed", str(2**64)], "seed must be in [0, 2^63), got "),
    "seed negative": (["train", "--seed", "-1"], "seed must be in [0, 2^63), got -1"),
    "no heads": (["train", "--n-head", "0"], "n_head must be at least 1, got 0"),
    "heads do not divide": (["train", "--preset", "cpu-baby", "--n-head", "3"],
                            "n_embd (128) must be divisible by n_head (3)"),
    "block negative": (["train", "--block-size", "-4"], "block_size must be at least 1"),
    "layers past int64": (["train", "--preset", "cpu-baby", "--n-layer", str(10**20)],
                          "the model would have 1.97e+25 parameters, more than tinygpt builds"),
    "width past int64": (["train", "--preset", "cpu-baby", "--n-embd", str(10**10)],
                         "the model would have 4.8e+21 parameters"),
    "block past int64": (["train", "--preset", "cpu-baby", "--block-size", str(10**20)],
                         "the model would have 1.28e+22 parameters"),
    "empty out-dir": (["train", "--out-dir", ""], "out_dir must not be empty"),
    "unknown preset": (["train", "--preset", "nope"], "unknown preset 'nope'; choose one of"),
    "log interval 0": (["train", "--log-interval", "0"], "--log-interval must be at least 1"),
    "temperature nan": (["sample", "--temperature", "nan"], "temperature must be a finite"),
    "temperature inf": (["sample", "--temperature", "inf"], "temperature must be a finite"),
    "temperature negative": (["sample", "--temperature", "-0.5"],
                             "temperature must be at least 0, got -0.5"),
    "sample seed past 64 bits": (["sample", "--seed", str(2**64)], "seed must be in [0, 2^63)"),
    "top-k 0": (["sample", "--top-k", "0"], "top_k must be at least 1, got 0"),
    "top-p above 1": (["sample", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    "top-p 0": (["sample", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    "negative length": (["sample", "--max-new-tokens", "-1"], "max_new_tokens must be at least 0"),
    "no samples": (["sample", "--num-samples", "0"], "num_samples must be at least 1"),
    "empty prompt": (["sample", "--prompt", ""], "--prompt must contain at least one character"),
    "resume with a preset": (["train", "--resume", "--preset", "bigram"],
                             "--resume and --preset cannot be used together"),
    "resume with overwrite": (["train", "--resume", "--overwrite"],
                              "--resume and --overwrite cannot be used together"),
    "new data without resume": (["train", "--new-data", "--data", "x.txt"],
                                "--new-data cannot be used here: it goes with --resume --data"),
    "threads 0": (["train", "--threads", "0"], "argument --threads: must be a whole number"),
    "sample threads": (["sample", "--threads", "two"], "argument --threads: must be a whole"),
    "unknown suite": (["bench", "speed"], "argument SUITE: unknown suite 'speed'; choose from"),
    # Numbers a resource or an index depends on have upper bounds (issue #41: these overflowed
    # inside torch or numpy, or ran out of memory with the wrong advice).
    "threads past 64 bits": (["train", "--threads", str(10**30)],
                             "argument --threads: must be at most"),
    "threads past the machine": (["sample", "--threads", str(usable_cores() + 1)],
                                 f"must be at most {usable_cores()} (the logical CPUs this "
                                 "process may run on)"),
    "micro-batches past 64 bits": (["train", "--grad-accum", str(10**30)],
                                   "grad_accum must be in [1, 4096], got 1000000000000000000000"),
    "evaluation batches past 64 bits": (["train", "--eval-iters", str(10**30)],
                                        "eval_iters must be in [1, 100000], got 100000000000"),
    "batch past 64 bits": (["train", "--batch-size", str(10**30)],
                           "batch_size must be in [1, 1048576], got 1000000000"),
    "join timeout inf": (["train", "--join-timeout", "inf"],
                         "argument --join-timeout: must be a number of seconds in (0, 86400]"),
    "join timeout nan": (["train", "--join-timeout", "nan"], "in (0, 86400], got 'nan'"),
    "join timeout 0": (["train", "--join-timeout", "0"], "in (0, 86400], got '0'"),
    "join timeout negative": (["train", "--join-timeout", "-5"], "in (0, 86400], got '-5'"),
    "doctor batch past 64 bits": (["doctor", "--batch-size", str(10**30)],
                                  "batch_size must be in [1, 1048576]"),
    "weight decay past 1/lr": (["train", "--preset", "cpu-baby", "--weight-decay", "1e300"],
                               "weight_decay (1e+300) times lr (0.003) must be below 1"),
    "bigram with transformer flags": (["train", "--preset", "bigram", "--n-layer", "8",
                                       "--n-embd", "999"],
                                      "--n-layer, --n-embd do not apply to the bigram model"),
    "bigram model with dropout": (["train", "--model", "bigram", "--dropout", "0.1"],
                                  "--dropout does not apply to the bigram model"),
    "muon on the bigram model": (["train", "--preset", "bigram", "--optimizer", "muon"],
                                 "--optimizer muon trains the weight matrices inside transformer "
                                 "blocks, and the bigram model (a vocab x vocab table) has none"),
    "muon lr with adamw": (["train", "--optimizer", "adamw", "--muon-lr", "0.01"],
                           "--muon-lr applies to --optimizer muon only, and this run's "
                           "optimizer is adamw"),
    "muon lr with a preset's adamw": (["train", "--preset", "bigram", "--muon-lr", "0.01"],
                                      "--muon-lr applies to --optimizer muon only"),
    "unknown optimizer": (["train", "--optimizer", "sgd"], "argument --optimizer: invalid choice"),
    "unknown decay": (["train", "--lr-decay", "step"], "argument --lr-decay: invalid choice"),
    "muon lr negative": (["train", "--muon-lr", "-0.02"], "muon_lr must be positive, got -0.02"),
    "no newton-schulz iterations": (["train", "--muon-ns-steps", "0"],
                                    "muon_ns_steps must be in [1, 10], got 0"),
    "newton-schulz iterations past 10": (["train", "--muon-ns-steps", "11"],
                                         "muon_ns_steps must be in [1, 10], got 11"),
    "newton-schulz iterations not whole": (["train", "--muon-ns-steps", "2.5"],
                                           "argument --muon-ns-steps: invalid int value: '2.5'"),
    "newton-schulz iterations with adamw": (["train", "--optimizer", "adamw", "--muon-ns-steps",
                                             "3"], "--muon-ns-steps applies to --optimizer muon "
                                                   "only, and this run's optimizer is adamw"),
    "weight decay past 1/muon lr": (["train", "--preset", "cpu-baby", "--optimizer", "muon",
                                     "--muon-lr", "0.5", "--weight-decay", "2"],
                                    "weight_decay (2) times muon_lr (0.5) must be below 1"),
    "sample with a training flag": (["sample", "--n-layer", "3"],
                                    "unrecognized arguments: --n-layer 3 (see `tinygpt sample "
                                    "--help`)"),
    "torchrun with a bad value": (["torchrun", "--nproc_per_node=2", "train", "--lr", "nan"],
                                  "lr must be a finite number, got nan"),
    "torchrun with an unknown flag": (["torchrun", "--nproc_per_node=2", "train", "--frob"],
                                      "unrecognized arguments: --frob (see `tinygpt train"),
    "torchrun without train": (["torchrun", "--nproc_per_node=2"],
                               "tinygpt torchrun runs `train`"),
}

_PROBE = """
import contextlib, io, json, sys
from tinygpt.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results[name] = [rc, err.getvalue(), out.getvalue()]
print(json.dumps({"results": results, "imported": sorted(
    m for m in ("torch", "triton", "numpy") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def answers(tmp_path_factory, run_command):
    """Every bad command line of BAD_ARGUMENTS, the --help pages and --version, in one fresh
    process."""
    out = tmp_path_factory.mktemp("answers") / "out"
    cases = {name: [*argv, *(["--out-dir", str(out)] if argv[0] == "train" and
                             "--out-dir" not in argv else [])]
             for name, (argv, _) in BAD_ARGUMENTS.items()}
    cases.update({"train help": ["train", "--help"], "sample help": ["sample", "--help"],
                  "cpu-baby help": ["train", "--preset", "cpu-baby", "--help"],
                  "version": ["--version"]})
    proc = run_command([sys.executable, "-c", _PROBE, json.dumps(cases)], timeout=120,
                       env={**os.environ, "COLUMNS": "300"})  # help lines unwrapped
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_argument_is_one_line(answers, name):
    found, out = answers
    rc, err, _ = found["results"][name]
    needle = BAD_ARGUMENTS[name][1]
    assert rc == 2, err
    assert err.startswith("tinygpt: error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert not out.exists()


def test_threads_are_bounded_by_the_cores_this_process_may_use(monkeypatch, capsys):
    """Under `taskset` or a container's CPU set, the machine's count is not the bound."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    with pytest.raises(SystemExit) as exit:
        main(["sample", "--threads", "2"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith("tinygpt: error: argument --threads: must be at most 1 (the logical "
                          "CPUs this process may run on), got 2"), err


def test_arguments_are_answered_before_torch_is_imported(answers):
    found, _ = answers
    assert found["imported"] == []
    for page in ("train help", "sample help", "cpu-baby help", "version"):
        rc, _, _ = found["results"][page]
        assert rc == 0


def test_help_shows_every_default(answers):
    """Each preset's values where they differ; one preset's with --preset; every sample flag."""
    pages = {name: re.sub(r"\s+", " ", found[2])
             for name, found in answers[0]["results"].items() if found[2]}
    assert "transformer blocks (default: shakespeare-char: 6, cpu-baby: 4, bigram: not used)" in (
        pages["train help"])
    assert "AdamW beta1 (default: 0.9)" in pages["train help"]
    assert "for each (default: shakespeare-char: 5, cpu-baby: 3, bigram: not used)" in (
        pages["train help"])
    assert "transformer blocks (default: 4)" in pages["cpu-baby help"]
    assert "(defaults: preset cpu-baby's)" in pages["cpu-baby help"]
    options = answers[0]["results"]["sample help"][2].split("options:", 1)[1]
    flags = re.split(r"\n  (?=--)", options)[1:]  # each flag with its help
    assert len(flags) == 13 and flags[0].startswith("--ckpt")
    for flag in flags:
        assert "(default: " in flag, flag
    assert answers[0]["results"]["version"][2] == f"tinygpt {tinygpt.__version__}\n"


@pytest.mark.parametrize("preset", ["shakespeare-char", "cpu-baby", "bigram"])
def test_max_iters_scales_the_schedule(preset):
    """--max-iters alone moves warm-up and decay in proportion (the decay ends at the last step,
    as in every preset); either, given, is kept."""
    _, base = from_preset(preset)
    _, short = from_preset(preset, max_iters=300)
    assert short.lr_decay_iters == 300 == round(base.lr_decay_iters * 300 / base.max_iters)
    assert short.warmup_iters == round(base.warmup_iters * 300 / base.max_iters)
    _, kept = from_preset(preset, max_iters=300, lr_decay_iters=250, warmup_iters=7)
    assert (kept.lr_decay_iters, kept.warmup_iters) == (250, 7)
    assert from_preset(preset, lr=1e-3)[1].lr_decay_iters == base.lr_decay_iters


def test_a_presets_muon_gives_way_to_adamw_for_the_bigram_model():
    """cpu-baby's Muon has no matrices to take in a bigram model: `--model bigram` on it trains
    with AdamW; only `--optimizer muon`, asked for, is refused."""
    assert from_preset("cpu-baby")[1].optimizer == "muon"
    assert from_preset("cpu-baby", model="bigram")[1].optimizer == "adamw"
    with pytest.raises(UserError, match="--optimizer muon trains the weight matrices"):
        from_preset("cpu-baby", model="bigram", optimizer="muon")


@pytest.mark.parametrize("config,needle", [
    (ModelConfig(n_head="2"), "n_head must be an integer, got '2'"),
    (ModelConfig(n_layer=True), "n_layer must be an integer, got True"),
    (ModelConfig(model="rnn"), "model must be one of gpt, bigram; got 'rnn'"),
    (ModelConfig(vocab_size=0), "vocab_size must be at least 1"),
    (TrainConfig(compile=1), "compile must be true or false, got 1"),
    (TrainConfig(grad_clip=float("-inf")), "grad_clip must be a finite number"),
    (TrainConfig(backend="fast"), "backend must be one of auto, triton, torch, reference"),
    (TrainConfig(seed=SEED_LIMIT), "seed must be in [0, 2^63)"),
    (SampleConfig(top_k=2.5), "top_k must be an integer, got 2.5"),
    (SampleConfig(cache="sometimes"), "cache must be one of shift, exact, off"),
])
def test_python_api_is_checked_the_same_way(config, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        config.validate()


def test_limits_themselves_are_accepted():
    ModelConfig(dropout=0.0, n_head=1, n_embd=1).validate()
    TrainConfig(lr=1e-12, min_lr=1e-12, weight_decay=0.0, grad_clip=0.0, warmup_iters=0,
                lr_decay_iters=0, max_iters=0, beta1=0.0, seed=SEED_LIMIT - 1).validate()
    SampleConfig(temperature=0.0, top_k=1, top_p=1.0, max_new_tokens=0, seed=0).validate()
    from_preset("bigram", lr=2, min_lr=2)


@pytest.mark.parametrize("model,bias", [("gpt", False), ("gpt", True), ("bigram", False)])
def test_parameter_count_is_known_before_the_model_is_built(model, bias):
    """What the memory check and the size bound count is what build_model builds."""
    cfg = ModelConfig(model=model, vocab_size=23, block_size=17, n_layer=3, n_head=2, n_embd=10,
                      bias=bias)
    assert cfg.num_params() == build_model(cfg).num_params()


def test_generate_checks_its_options():
    model = build_model(ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8))
    prompt = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(UserError, match="temperature must be a finite number, got nan"):
        generate(model, prompt, 3, temperature=float("nan"))
    with pytest.raises(UserError, match="top_p must be in"):
        generate(model, prompt, 3, top_p=0.0)


def _checkpoint(tmp_path, **changes) -> str:
    """A small valid checkpoint, with `changes` made to its payload (`model_config`,
    `train_config` and `model` entries merged into the real ones)."""
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    payload = {"model_config": vars(cfg), "train_config": {}, "iteration": 0,
               "model": build_model(cfg).state_dict(), "vocab": "abcdefghijk"}
    for key, value in changes.items():
        payload[key] = {**payload[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "best.pt"
    save_checkpoint(path, payload)
    return str(path)


HOSTILE_CHECKPOINTS = {
    "no heads": (dict(model_config={"n_head": 0}),
                 "has an invalid model_config: n_head must be at least 1, got 0"),
    "heads do not divide": (dict(model_config={"n_head": 3}),
                            "invalid model_config: n_embd (16) must be divisible by n_head (3)"),
    "negative block": (dict(model_config={"block_size": -16}),
                       "invalid model_config: block_size must be at least 1, got -16"),
    "layers as text": (dict(model_config={"n_layer": "1"}), "n_layer must be an integer"),
    "config not a dict": (dict(model_config=[1, 2]), "has an unreadable model_config"),
    "lr nan": (dict(train_config={"lr": float("nan")}),
               "invalid train_config: lr must be a finite number"),
    "unknown optimizer": (dict(train_config={"optimizer": "sgd"}),
                          "invalid train_config: optimizer must be one of adamw, muon; got 'sgd'"),
    "no newton-schulz iterations": (dict(train_config={"optimizer": "muon", "muon_ns_steps": 0}),
                                    "invalid train_config: muon_ns_steps must be in [1, 10], "
                                    "got 0"),
    "muon for a bigram": (dict(model_config={"model": "bigram"},
                               train_config={"optimizer": "muon"}),
                          "invalid train_config: --optimizer muon trains the weight matrices "
                          "inside transformer blocks, and the bigram model"),
    "format version text": (dict(format_version="1"),
                            "is not a tinygpt checkpoint (format version '1')"),
    "negative iteration": (dict(iteration=-3), "has a malformed iteration (-3)"),
    "longer vocabulary": (dict(vocab="abcdefghijkl"),
                          "12 characters in its vocabulary but a model built for 11"),
    "longer vocabulary and config": (dict(vocab="abcdefghijkl", model_config={"vocab_size": 12}),
                                     "its weights do not fit the model its config describes "
                                     "(tok_emb.weight is (11, 16) float32, the model's is "
                                     "(12, 16) float32)"),
    # The config is checked against the weights on the meta device: nothing is allocated for
    # the 512 GB embedding it claims.
    "enormous block": (dict(model_config={"block_size": 10**9}),
                       "pos_emb.weight is (16, 16) float32, the model's is (1000000000, 16)"),
    "weights as integers": (dict(model={"ln_f.weight": torch.ones(16, dtype=torch.long)}),
                            "ln_f.weight is (16,) int64, the model's is (16,) float32"),
}


@pytest.mark.parametrize("changes,needle", HOSTILE_CHECKPOINTS.values(),
                         ids=HOSTILE_CHECKPOINTS.keys())
def test_hostile_checkpoint_is_one_line(tmp_path, capsys, changes, needle):
    path = _checkpoint(tmp_path, **changes)
    rc = main(["sample", "--ckpt", path, "--prompt", "a", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"tinygpt: error: checkpoint {path}") and needle in err, err


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16)
    state = build_model(cfg).state_dict()
    state["blocks.0.mlp.fc.weight"][3, 4] = float("nan")
    state["ln_f.weight"][0] = float("inf")
    path = _checkpoint(tmp_path, model=state)
    rc = main(["sample", "--ckpt", path, "--prompt", "a", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert (f"checkpoint {path} has non-finite weights (NaN or inf in blocks.0.mlp.fc.weight, "
            "ln_f.weight)") in err


@pytest.mark.parametrize("rank", [0, 1])
def test_a_torchrun_rank_other_than_0_speaks_only_after_a_grace(monkeypatch, capsys, rank):
    """torchrun stops every process once one exits: rank 0 reports at once; the others wait, so
    that a mistake all of them make is reported by rank 0 alone, never lost with the first rank
    to exit."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    assert main(["train", "--lr", "nan"]) == 2
    tag = f" (rank {rank})" if rank else ""
    assert capsys.readouterr().err == f"tinygpt: error{tag}: lr must be a finite number, got nan\n"
    assert slept == ([cli.RANK_GRACE_S] if rank else [])
