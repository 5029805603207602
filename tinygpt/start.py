"""How a run starts: new from a preset, or resumed from `OUT_DIR/last.pt`. The configs, the text
and its record (path and sha256, which checkpoints keep) are settled here, before anything is
built; a resumed run must agree with its checkpoint on the model, the optimizer, the vocabulary
and the text. Once the run's parts are built, `restore` puts the checkpoint's state into them."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

from . import streams
from .checkpoint import check_training_state, load_checkpoint
from .config import ModelConfig, TrainConfig, refuse_unused
from .corpus import Corpus, load
from .data import (
    SHAKESPEARE_SHA256,
    Batches,
    ByteTokenizer,
    Tokenizer,
    cache_dir,
    default_corpus,
    tokenizer_for,
)
from .errors import UserError
from .launch import Context
from .optim import Optimizers
from .rundir import existing_run_files


@dataclasses.dataclass
class Start:
    """What a run starts from."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    corpus: Corpus
    data: dict  # the corpus's record: {path, sha256}
    tokenizer: Tokenizer | ByteTokenizer
    preset: str | None  # None when resumed
    ckpt: dict | None  # the checkpoint a resumed run goes on from
    ckpt_path: Path | None
    replacing: list[str]  # an earlier run's checkpoints, which --overwrite removes


def settle(preset: str, configs: tuple[ModelConfig, TrainConfig] | None, overrides: dict,
           out_dir: Path, ctx: Context, data: str | None, *, new_data: bool,
           overwrite: bool) -> Start:
    """A new run from `configs` (the preset with `overrides`), or with `configs` None, the run
    that `out_dir/last.pt` holds, resumed with `overrides`. A new run refuses an out_dir with
    another run's checkpoints unless `overwrite`; see `_load_corpus` for `data` and `new_data`.
    Without a `grad_accum` override a new run gives every process the preset's micro-batches."""
    ckpt = ckpt_path = None
    replacing = []
    if configs is None:
        ckpt_path = out_dir / "last.pt"
        ckpt = load_checkpoint(ckpt_path)
    elif ctx.is_main and (replacing := existing_run_files(out_dir)) and not overwrite:
        raise UserError(f"{out_dir}/ already holds a run ({', '.join(replacing)}); continue "
                        "it with --resume, or pass --overwrite or another --out-dir")
    # Every rank reads the same prepared file (one prepares it while the others wait); only
    # rank 0 says how preparation goes.
    kept = configs[1] if ckpt is None else TrainConfig(**ckpt["train_config"])
    if ckpt is not None:
        for name, why in (("tokenizer", "the tokens its model was trained on"),
                          ("split", "the text it holds out for validation")):
            if overrides.get(name) not in (None, getattr(kept, name)):
                raise UserError(f"--{name} {overrides[name]} differs from the checkpoint's "
                                f"{getattr(kept, name)}; a resumed run keeps {why}")
    corpus = _load_corpus(data, ckpt, ckpt_path, new_data, kept.tokenizer,
                          say=_say if ctx.is_main else lambda line: None)
    record, tokenizer = corpus.record, tokenizer_for(kept.tokenizer, corpus.vocab)
    if ckpt is not None:
        if ckpt["vocab"] != tokenizer.chars:
            raise UserError(
                f"{record['path']} has a different vocabulary ({tokenizer.vocab_size} "
                f"characters) from the checkpoint's ({len(ckpt['vocab'])}); resume with the "
                "same data")
        model_cfg, cfg = _resume_configs(ckpt, overrides)
    else:
        model_cfg, cfg = configs
        model_cfg.vocab_size = tokenizer.vocab_size
        if overrides.get("grad_accum") is None:
            cfg.grad_accum *= ctx.world_size  # the preset's micro-batches on every process
    if cfg.grad_accum % ctx.world_size:
        raise UserError(f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of "
                        f"processes ({ctx.world_size}), which share its micro-batches out")
    return Start(model_cfg, cfg, corpus, record, tokenizer, preset if ckpt is None else None,
                 ckpt, ckpt_path, replacing if overwrite else [])


def restore(start: Start, model: torch.nn.Module, optimizer: Optimizers, batches: Batches,
            ctx: Context) -> tuple[int, float, bool]:
    """Where the run goes from: the iteration, the best validation loss so far, and whether that
    iteration's evaluation is done. A resumed run's checkpoint goes into its parts (weights,
    optimizer state, random streams), each checked before any of it is loaded."""
    ckpt = start.ckpt
    if ckpt is None:
        return 0, math.inf, False
    check_training_state(ckpt, start.ckpt_path, optimizer, batches.device)
    model.load_state_dict(ckpt["model"])  # checked by load_checkpoint
    optimizer.load_state(ckpt["optimizer"])
    streams.restore(ckpt["rng"], batches, batches.device, ctx)
    return ckpt["iteration"], float(ckpt["best_val_loss"]), ckpt["evaluated"]


def _say(line: str) -> None:
    print(f"tinygpt: {line}", file=sys.stderr, flush=True)


def _load_corpus(data: str | None, ckpt: dict | None, ckpt_path: Path | None,
                 new_data: bool, tokenizer: str, say) -> Corpus:
    """The corpus to train on, prepared (its record goes into checkpoints): --data FILE, else
    the file a resumed run's checkpoint names, else tiny Shakespeare. A resumed run refuses a text
    other than its own unless `new_data`."""
    recorded = ckpt.get("data") if ckpt is not None else None
    if data is not None:
        path = Path(data)
    elif recorded is not None and os.path.isfile(recorded["path"]):
        path = Path(recorded["path"])
    elif recorded is not None and recorded["sha256"] != SHAKESPEARE_SHA256:
        raise UserError(f"{ckpt_path} was trained on {recorded['path']}, which is not there any "
                        "more; pass that text with --data FILE")
    else:  # a new run without --data, or one on tiny Shakespeare (downloaded again if need be)
        path = default_corpus()
    corpus = load(path, tokenizer, cache_dir() / "corpora", say)
    if recorded is not None and corpus.sha256 != recorded["sha256"] and not new_data:
        raise UserError(f"{path} is not the text {ckpt_path} was trained on ({recorded['path']}, "
                        f"sha256 {recorded['sha256'][:12]}...); resume on that text, or pass "
                        "--new-data to go on with this one")
    return corpus


def _resume_configs(ckpt: dict, overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    """The checkpoint's configs; training fields may be overridden, model fields and the
    optimizer (whose state would not carry over) must agree."""
    model_cfg = ModelConfig(**ckpt["model_config"])
    train_cfg = TrainConfig(**ckpt["train_config"])
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in overrides.items():
        if name in model_names and value is not None and getattr(model_cfg, name) != value:
            raise UserError(
                f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                f"{getattr(model_cfg, name)}; a resumed run keeps the model it was started with"
            )
    if overrides.get("optimizer") not in (None, train_cfg.optimizer):
        raise UserError(f"--optimizer {overrides['optimizer']} differs from the checkpoint's "
                        f"{train_cfg.optimizer}; a resumed run keeps the optimizer it was started "
                        "with, whose state it goes on from")
    train_overrides = {k: v for k, v in overrides.items()
                       if k not in model_names and v is not None}
    refuse_unused(model_cfg.model, train_cfg.optimizer, train_overrides)
    train_cfg = TrainConfig(**{**ckpt["train_config"], **train_overrides})
    train_cfg.validate()
    return model_cfg, train_cfg
