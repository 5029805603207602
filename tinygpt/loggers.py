"""Where a run's records go besides OUT_DIR/metrics.jsonl (`--log tensorboard`, `--log wandb`):
the same scalars, and the configuration as hyperparameters. Each is an optional dependency; every
problem with one (a missing package, an unwritable directory, no W&B login) is a UserError before
training starts, and a failure later costs that logger, never the run."""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError, first_line, os_reason

KINDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log NAME -> the package it needs


def check(kinds: list[str]) -> None:
    """Each of `kinds` named and installed; answered before torch is imported."""
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"--log {kind}: choose among {', '.join(KINDS)}")
        if importlib.util.find_spec(KINDS[kind]) is None:
            raise UserError(f"--log {kind} needs the {KINDS[kind]} package: pip install "
                            f"'tinygpt[{kind}]'")


def scalars(record: dict) -> dict[str, float]:
    """A step or evaluation record's numbers, by the names both loggers show."""
    if record["kind"] == "step":
        found = {"train/loss": record["loss"], "train/grad_norm": record["grad_norm"],
                 "speed/ms_per_step": record["ms_per_step"],
                 "speed/tokens_per_s": record["tokens_per_s"], "speed/threads":
                 record.get("threads"), "cuda/memory_mib": record.get("cuda_memory_mib"),
                 **{f"lr/{name}": lr for name, lr in record["lr"].items()}}
    elif record["kind"] == "eval":
        found = {"eval/train_loss": record["train"], "eval/val_loss": record["val"],
                 "eval/val_bits": record["val_bits"], "eval/best_val_loss": record["best_val"]}
    else:
        return {}
    return {name: float(value) for name, value in found.items() if value is not None}


def hyperparameters(header: dict) -> dict:
    """The run's configuration, flat: model.n_layer, train.lr, ..., data.path."""
    flat = {f"{part}.{name}": value for part, fields in header["config"].items()
            for name, value in fields.items()}
    flat.update({f"data.{name}": value for name, value in header["data"].items()})
    flat.update(backend=header["backend"], device=header["device_name"],
                processes=header["processes"])
    return flat


class TensorBoard:
    """Event files in OUT_DIR/tensorboard (`tensorboard --logdir OUT_DIR`). A resumed run purges
    the events past its checkpoint, as metrics.jsonl drops its records."""

    def __init__(self, out_dir: Path, header: dict, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = out_dir / "tensorboard"
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            probe = log_dir / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--log tensorboard cannot write {log_dir} ({os_reason(e)})") from e
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resumed_at is None
                                    else resumed_at + 1)
        if resumed_at is None:
            self.writer.add_text("config", "```\n" + json.dumps(header, indent=1) + "\n```")
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in hyperparameters(header).items()}
            self.writer.add_hparams(flat, {}, run_name=".")

    def record(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["iter"])

    def checkpointed(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run with the run's id (a resumed run goes on in it), under OUT_DIR/wandb;
    WANDB_MODE=offline keeps it on disk for `wandb sync`."""

    def __init__(self, out_dir: Path, header: dict, run_id: str):
        mode = os.environ.get("WANDB_MODE", "online")
        if mode not in ("offline", "disabled", "dryrun") and not _wandb_key():
            raise UserError("--log wandb: not logged in to Weights & Biases; run `wandb login`, "
                            "set WANDB_API_KEY, or set WANDB_MODE=offline to sync later")
        import wandb

        try:
            (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tinygpt"), id=run_id,
                                  name=out_dir.resolve().name, resume="allow", dir=str(out_dir),
                                  config=hyperparameters(header),
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # login, network, permissions: W&B's own words, on one line
            raise UserError(f"--log wandb could not start a run: {first_line(e)}") from e

    def record(self, record: dict) -> None:
        found = scalars(record)
        if found:
            self.run.log(found, step=record["iter"])

    def checkpointed(self) -> None:
        pass  # W&B writes as it goes

    def close(self) -> None:
        self.run.finish()


def _wandb_key() -> bool:
    """Whether W&B has an API key here: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start(kinds: list[str], out_dir: Path, header: dict, run_id: str,
          resumed_at: int | None) -> list:
    """The loggers `kinds` names, started (each a UserError if it cannot be)."""
    made = []
    try:
        for kind in kinds:
            made.append(TensorBoard(out_dir, header, resumed_at) if kind == "tensorboard"
                        else WandB(out_dir, header, run_id))
    except BaseException:
        for logger in made:
            logger.close()
        raise
    return made


def failed(kind: str, error: BaseException) -> None:
    print(f"tinygpt: {kind} failed ({first_line(error)}); the run goes on without it",
          file=sys.stderr)
