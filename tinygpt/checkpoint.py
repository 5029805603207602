"""Checkpoints: written atomically, read back without executing code, checked before use.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts saved with
`torch.save` and loaded with `weights_only=True`, so loading one never unpickles arbitrary objects.
A file can still be malformed, by damage or by design: its weights are checked against the model
its config describes (`load_checkpoint`), and its training state against the optimizer and
random streams it goes into (`check_training_state`), before any of it is loaded.
"""

from __future__ import annotations

import errno
import math
import os
import re
import warnings
from pathlib import Path

import torch

from .config import ModelConfig, TrainConfig, refuse_unused
from .errors import UserError, first_line, os_reason
from .files import write_atomically
from .model import build_model
from .optim import Optimizers, expected_state

FORMAT_VERSION = 2  # 2: the optimizer state is a dict of parts ({"adamw": ..., "muon": ...})
REQUIRED_KEYS = ("format_version", "model_config", "train_config", "model", "iteration", "vocab")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write `payload` to `path` atomically (`write_atomically`). A failed write (a full disk,
    say) raises UserError naming the path and the reason, and leaves the old file as it was."""
    path = Path(path)
    kept = ("the previous checkpoint there is unchanged" if path.exists()
            else "no checkpoint was written there")
    try:
        write_atomically(path, lambda f: torch.save({"format_version": FORMAT_VERSION,
                                                     **payload}, f))
    except (OSError, RuntimeError) as e:
        reason = os_reason(e)
        if isinstance(e, RuntimeError) and reason == str(e):
            raise  # torch failed for a reason of its own, not the file system's
        raise UserError(f"could not write checkpoint {path} ({reason}); {kept}") from e


class Writer:
    """Writes a run's checkpoints into `out_dir`. Its first write removes `replacing`, an earlier
    run's checkpoints that --overwrite replaces, so that the directory never holds both runs';
    `wrote` tells whether it holds this run's (a resumed run's, from the start)."""

    def __init__(self, out_dir: Path, replacing: list[str], wrote: bool):
        self.out_dir, self.replacing, self.wrote = out_dir, replacing, wrote

    def save(self, name: str, payload: dict) -> None:
        for old in self.replacing:
            (self.out_dir / old).unlink(missing_ok=True)
        self.replacing = []
        save_checkpoint(self.out_dir / name, payload)
        self.wrote = True


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and check a checkpoint; every problem becomes one UserError naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's remarks on the pickle: the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except OSError as e:
        if e.errno != errno.EINVAL:  # unreadable, a directory, ...
            raise UserError(f"cannot read checkpoint {path} ({os_reason(e)})") from e
        # EINVAL: the zip reader sought past the end of a torn file
        raise UserError(f"checkpoint {path} is corrupt or truncated (its zip index points "
                        "past its end)") from e
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        raise UserError(f"checkpoint {path} {_load_failure(e)}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UserError(f"checkpoint {path} is not a tinygpt checkpoint (missing fields)")
    version = ckpt["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"checkpoint {path} is not a tinygpt checkpoint (format version "
                        f"{version!r})")
    if version > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {version}, newer than this tinygpt "
            f"understands ({FORMAT_VERSION}); upgrade tinygpt"
        )
    if version == 1 and "optimizer" in ckpt:  # one AdamW's state, from before Muon
        ckpt["optimizer"] = {"adamw": ckpt["optimizer"]}
    configs = {}
    for key, cls in (("model_config", ModelConfig), ("train_config", TrainConfig)):
        try:
            configs[key] = cls(**ckpt[key])
        except TypeError as e:
            raise UserError(f"checkpoint {path} has an unreadable {key} ({e})") from e
        try:
            configs[key].validate()
        except UserError as e:
            raise UserError(f"checkpoint {path} has an invalid {key}: {e}") from e
    try:
        refuse_unused(configs["model_config"].model, configs["train_config"].optimizer, {})
    except UserError as e:
        raise UserError(f"checkpoint {path} has an invalid train_config: {e}") from e
    vocab, vocab_size = ckpt["vocab"], configs["model_config"].vocab_size
    if not isinstance(vocab, str) or len(set(vocab)) != len(vocab):
        raise UserError(f"checkpoint {path} has a malformed vocabulary (not a string of distinct "
                        "characters)")
    if len(vocab) != vocab_size:
        raise UserError(f"checkpoint {path} has {len(vocab)} characters in its vocabulary but a "
                        f"model built for {vocab_size}")
    data = ckpt.get("data")  # absent from checkpoints older than the record
    if data is not None and not (
            isinstance(data, dict) and isinstance(data.get("path"), str)
            and isinstance(data.get("sha256"), str) and len(data["sha256"]) == 64):
        raise UserError(f"checkpoint {path} has a malformed data record ({data!r:.80})")
    backend = ckpt.get("backend")  # the backend that trained it; absent from older checkpoints
    if backend is not None and backend not in ("torch", "triton", "reference"):
        raise UserError(f"checkpoint {path} names an unknown backend ({backend!r:.40})")
    iteration, weights = ckpt["iteration"], ckpt["model"]
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise UserError(f"checkpoint {path} has a malformed iteration ({iteration!r})")
    if not isinstance(weights, dict) or not all(map(torch.is_tensor, weights.values())):
        raise UserError(f"checkpoint {path} has malformed weights (not a dict of tensors)")
    broken = [name for name, t in weights.items()
              if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise UserError(f"checkpoint {path} has non-finite weights (NaN or inf in "
                        f"{', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")
    _check_weights(weights, configs["model_config"], path)
    return ckpt


def _load_failure(e: Exception) -> str:
    """What a failed `torch.load` says of the file: an object it refuses (the global the
    unpickler met), or damage."""
    text = str(e)
    if found := re.search(r"GLOBAL ([\w.]+)", text):  # a function or class, named
        what = found[1]
        return (f"holds an object tinygpt does not load ({what}); only tensors, numbers, "
                "strings, lists and dicts are read, and nothing in the file was run")
    reason = first_line(e).split(". ")[0]
    return f"is corrupt or truncated ({reason})"


def _check_weights(weights: dict, config: ModelConfig, path: Path) -> None:
    """UserError unless `weights` are exactly the tensors of the model `config` builds, each of
    its shape: told from a model on the meta device, so nothing is allocated for a config that
    claims a huge model."""
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        names = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in unexpected]
        more = ", ..." if len(names) > 2 else ""
        raise UserError(f"checkpoint {path}: its weights do not fit the model its config "
                        f"describes ({', '.join(names[:2])}{more})")
    for name, want in expected.items():
        got = weights[name]
        if got.shape != want.shape or not got.is_floating_point():
            raise UserError(f"checkpoint {path}: its weights do not fit the model its config "
                            f"describes ({name} is {_describe(got)}, the model's is "
                            f"{_describe(want)})")


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def check_training_state(ckpt: dict, path: Path, optimizer: Optimizers,
                         device: torch.device) -> None:
    """UserError unless `ckpt` holds training state that fits what will consume it, checked
    before any of it is loaded: for each of the run's optimizers (`optim.Optimizers`), its
    per-parameter state (`optim.expected_state`: each tensor's name, shape and whether it may be
    negative) in its layout of parameter groups; random-number states each generator accepts, a
    best loss and flags of their types. A malformed tensor reaching a fused optimizer kernel can
    crash the process."""
    missing = sorted({"optimizer", "rng", "best_val_loss", "evaluated"} - ckpt.keys())
    if missing:
        raise UserError(f"checkpoint {path} lacks the training state to resume from "
                        f"({', '.join(missing)})")

    def bad(what: str) -> UserError:
        return UserError(f"checkpoint {path} has a malformed {what}; it cannot be resumed")

    best = ckpt["best_val_loss"]
    if (not isinstance(best, (int, float)) or isinstance(best, bool) or math.isnan(best)
            or best < 0):
        raise bad(f"best_val_loss ({best!r:.40})")
    if not isinstance(ckpt["evaluated"], bool):
        raise bad(f"evaluated flag ({ckpt['evaluated']!r:.40})")
    _check_optimizer(ckpt["optimizer"], optimizer, bad)
    _check_rng(ckpt["rng"], device, bad)


def _check_optimizer(saved, optimizers: Optimizers, bad) -> None:
    names = list(optimizers.parts)
    if not (isinstance(saved, dict) and list(saved) == names):
        found = ", ".join(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise bad(f"optimizer state (it holds {found:.60}; this run steps {', '.join(names)})")
    for name, optimizer in optimizers.parts.items():
        _check_part(name, saved[name], optimizer,
                    lambda what, name=name: bad(f"optimizer state ({name}: {what})"))


def _check_part(name: str, saved, optimizer: torch.optim.Optimizer, bad) -> None:
    """One optimizer's state, `saved`, against `optimizer` and `expected_state(name, ...)`."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)
            and all(isinstance(g, dict) for g in saved["param_groups"])):
        raise bad("not a dict of state and param_groups")
    layout = [g["params"] for g in optimizer.state_dict()["param_groups"]]
    if [g.get("params") for g in saved["param_groups"]] != layout:
        raise bad("its parameter groups are not this model's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in saved["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params) and isinstance(state, dict)):
            raise bad(f"entry {index!r:.20}")
        expected = expected_state(name, params[index])
        if state.keys() != expected.keys():
            raise bad(f"parameter {index} has {', '.join(sorted(state))}; expected "
                      f"{', '.join(sorted(expected))}")
        for key, (shape, may_be_negative) in expected.items():
            t = state[key]
            if not (torch.is_tensor(t) and t.is_floating_point() and t.shape == shape):
                got = _describe(t) if torch.is_tensor(t) else type(t).__name__
                raise bad(f"{key} of parameter {index} is {got}; expected {tuple(shape)} "
                          "floating point")
            if not torch.isfinite(t).all() or (not may_be_negative and (t < 0).any()):
                raise bad(f"{key} of parameter {index} holds "
                          f"{'non-finite' if not torch.isfinite(t).all() else 'negative'} values")


def _check_rng(rng, device: torch.device, bad) -> None:
    """Every random-number state is one its generator accepts, tried on throwaway generators
    (CUDA's on CUDA only), and a CUDA job's holds a CUDA stream for each process."""
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), list) and rng["torch"]
            and isinstance(rng.get("batches"), dict) and "cuda" in rng
            and (rng["cuda"] is None or isinstance(rng["cuda"], list))):
        raise bad("random-number state (not the torch, cuda and batches streams)")
    states = [("torch", "cpu", s) for s in rng["torch"]]
    if rng["cuda"] is not None:  # a CUDA job's: a stream per process, put back on CUDA only
        cuda, processes = len(rng["cuda"]), len(rng["torch"])
        if cuda != processes:
            raise bad(f"random-number state ({cuda} CUDA stream{'s' * (cuda != 1)} beside "
                      f"{processes} torch stream{'s' * (processes != 1)})")
        if not all(torch.is_tensor(s) and s.dtype == torch.uint8 for s in rng["cuda"]):
            raise bad("random-number state (cuda: not a generator's state)")
        if device.type == "cuda":
            states += [("cuda", device, s) for s in rng["cuda"]]
    for stream, state in rng["batches"].items():
        if not isinstance(stream, int):
            raise bad(f"random-number state (batch stream {stream!r:.20})")
        states.append((f"batch stream {stream}", "cpu", state))
    for what, on, state in states:
        try:
            torch.Generator(device=on).set_state(state)
        except (RuntimeError, TypeError) as e:
            raise bad(f"random-number state ({what}: {first_line(e)})") from e
