"""Model, training and sampling configuration: three dataclasses and the named presets.

Every field carries a help string and the values it accepts; the command line builds one `--flag`
per field from them, so a preset is only a set of defaults and any field can be overridden
(`--n-layer 4`). `validate()` is the one check of a config, whether it came from the command line,
the Python API or a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import UserError

MAX_PARAMS = 2**40  # a bound on model size that keeps every count and shape far inside int64
MAX_BATCH_SIZE = 2**20  # sequences drawn per micro-batch: a bound on the indices of a batch
MAX_MICRO_BATCHES = 4096  # each keeps a random stream (5 KB of state, in every checkpoint)
MAX_EVAL_ITERS = 100_000  # an evaluation keeps a loss per batch; far more than a full pass
SEED_LIMIT = 2**63  # seeds are in [0, 2^63): torch takes 64-bit seeds, and training adds the rank
_TYPES = {"int": (int, "an integer"), "float": ((int, float), "a number"),
          "str": (str, "a string"), "bool": (bool, "true or false")}


def _f(default, help: str, **accepts):
    """A field: its default, its help, and what it accepts: `choices`, bounds `at_least` /
    `above` / `below` / `at_most`, `nonempty`; `cli=False` keeps it off the command line, and
    `gpt_only=True` marks what the bigram model has no use for, `muon_only=True` what AdamW
    alone has no use for."""
    return field(default=default, metadata={"help": help, **accepts})


def _bounds(rules) -> str:
    """The range `rules` allow, in words: 'at least 1', 'positive', 'in [0, 1)'."""
    def num(v) -> str:
        if v == SEED_LIMIT:
            return "2^63"
        return str(v) if isinstance(v, int) else f"{v:g}"

    low = ("[", rules["at_least"]) if "at_least" in rules else ("(", rules.get("above"))
    high = ("]", rules["at_most"]) if "at_most" in rules else (")", rules.get("below"))
    if low[1] is not None and high[1] is not None:
        return f"in {low[0]}{num(low[1])}, {num(high[1])}{high[0]}"
    if high[1] is not None:
        return f"{'at most' if high[0] == ']' else 'below'} {num(high[1])}"
    if low[0] == "(":
        return "positive" if low[1] == 0 else f"above {num(low[1])}"
    return f"at least {num(low[1])}"


def check_field(f: dataclasses.Field, value) -> None:
    """UserError unless `value` is of `f`'s type, finite, and among the values it accepts."""
    kind = f.type.removesuffix(" | None")
    if value is None and kind != f.type:
        return
    types, noun = _TYPES[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
        raise UserError(f"{f.name} must be {noun}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{f.name} must be a finite number, got {value}")
    rules = f.metadata
    if rules.get("nonempty") and not value:
        raise UserError(f"{f.name} must not be empty")
    if "choices" in rules and value not in rules["choices"]:
        raise UserError(f"{f.name} must be one of {', '.join(rules['choices'])}; got {value!r}")
    if kind in ("int", "float") and not (
            rules.get("at_least", -math.inf) <= value <= rules.get("at_most", math.inf)
            and rules.get("above", -math.inf) < value < rules.get("below", math.inf)):
        raise UserError(f"{f.name} must be {_bounds(rules)}, got {value}")


def check_values(cls, values: dict) -> None:
    """`check_field` for those of `values` that name a field of `cls`: a whole config, or
    options on their own, before the preset that completes them is known."""
    for f in dataclasses.fields(cls):
        if f.name in values:
            check_field(f, values[f.name])


@dataclass
class ModelConfig:
    model: str = _f("gpt", "architecture", choices=("gpt", "bigram"))
    vocab_size: int = _f(65, "number of distinct characters (set from the corpus)", cli=False,
                         at_least=1)
    block_size: int = _f(256, "context length in characters", at_least=1)
    n_layer: int = _f(6, "transformer blocks", at_least=1, gpt_only=True)
    n_head: int = _f(6, "attention heads per block", at_least=1, gpt_only=True)
    n_embd: int = _f(384, "embedding width (divisible by n_head)", at_least=1, gpt_only=True)
    dropout: float = _f(0.2, "dropout on attention weights, residual branches and embeddings",
                        at_least=0.0, below=1.0, gpt_only=True)
    bias: bool = _f(False, "biases in Linear and LayerNorm layers", gpt_only=True)

    def validate(self) -> None:
        check_values(type(self), vars(self))
        if self.model == "gpt" and self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (n := self.num_params()) > MAX_PARAMS:
            raise UserError(f"the model would have {n:.3g} parameters, more than tinygpt builds "
                            "(2^40, about 1.1e12); lower --n-layer, --n-embd or --block-size")

    def num_params(self) -> int:
        """Parameters of the model this config builds, counted from its shapes alone (the head
        shares the token embedding's weight)."""
        V, C = self.vocab_size, self.n_embd
        if self.model == "bigram":
            return V * V

        def linear(n_in: int, n_out: int) -> int:
            return n_in * n_out + (n_out if self.bias else 0)

        norm = C * (2 if self.bias else 1)
        block = linear(C, 3 * C) + linear(C, C) + linear(C, 4 * C) + linear(4 * C, C) + 2 * norm
        return V * C + self.block_size * C + self.n_layer * block + norm


def params_words(n: int) -> str:
    """A parameter count as start lines show it: '4,225 params', '10.79M params'."""
    return f"{n:,} params" if n < 1_000_000 else f"{n / 1e6:.2f}M params"


@dataclass
class TrainConfig:
    batch_size: int = _f(64, "sequences per micro-batch", at_least=1, at_most=MAX_BATCH_SIZE)
    grad_accum: int = _f(1, "micro-batches per optimizer step (global batch: batch_size x "
                            "grad_accum), shared out among torchrun processes; left out under "
                            "torchrun, each process takes the preset's number", at_least=1,
                   at_most=MAX_MICRO_BATCHES)
    max_iters: int = _f(5000, "optimizer steps in total; a new run's warm-up and decay scale "
                              "with it unless given", at_least=0)
    optimizer: str = _f("adamw", "adamw for every parameter, or muon for the weight matrices "
                                 "inside the blocks and adamw for the rest",
                         choices=("adamw", "muon"))
    lr: float = _f(1e-3, "AdamW's peak learning rate", above=0.0)
    muon_lr: float = _f(0.02, "Muon's peak learning rate (--optimizer muon)", above=0.0,
                        muon_only=True)
    muon_ns_steps: int = _f(5, "Newton-Schulz iterations of Muon's orthogonalization (--optimizer "
                                "muon), with Polar Express's polynomial for each", at_least=1,
                            at_most=10, muon_only=True)
    min_lr: float = _f(1e-4, "AdamW's learning rate at the end of the decay (at most lr; "
                             "Muon's ends at the same fraction of its peak)", at_least=0.0)
    warmup_iters: int = _f(100, "linear warm-up steps", at_least=0)
    lr_decay_iters: int = _f(5000, "step at which the decay reaches min_lr", at_least=0)
    lr_decay: str = _f("cosine", "shape of the decay from lr to min_lr: cosine, or linear",
                       choices=("cosine", "linear"))
    beta1: float = _f(0.9, "AdamW beta1", at_least=0.0, below=1.0)
    beta2: float = _f(0.99, "AdamW beta2", at_least=0.0, below=1.0)
    weight_decay: float = _f(0.1, "weight decay, applied to 2-D weights only", at_least=0.0)
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 disables)", at_least=0.0)
    eval_interval: int = _f(250, "evaluate train/val loss every this many steps", at_least=1)
    eval_iters: int = _f(200, "batches per split in each evaluation", at_least=1,
                         at_most=MAX_EVAL_ITERS)
    seed: int = _f(1337, "random seed for weights, batches and dropout", at_least=0,
                   below=SEED_LIMIT)
    tokenizer: str = _f("chars", "chars: a token per character of UTF-8 text; bytes: a token "
                                 "per byte of any file, as the enwik8 literature counts",
                        choices=("chars", "bytes"))
    split: str = _f("0.9,0.1", "train,val[,test] parts of the corpus, in its order: fractions "
                               "that sum to 1, or token counts with K, M or G (90M,5M,5M splits "
                               "enwik8 and text8 as their literature does)", nonempty=True)
    device: str = _f("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu",
                     nonempty=True)
    backend: str = _f(
        "auto", "attention/LayerNorm implementation",
        choices=("auto", "triton", "torch", "reference"),
    )
    compile: bool = _f(False, "wrap the model in torch.compile")
    out_dir: str = _f("out", "directory for checkpoints", nonempty=True)

    def validate(self) -> None:
        check_values(type(self), vars(self))
        split_ends(self.split, None)
        if self.min_lr > self.lr:
            raise UserError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        rates = [("lr", self.lr)] + ([("muon_lr", self.muon_lr)] if self.optimizer == "muon"
                                     else [])
        for name, lr in rates:  # each step scales weights by 1 - lr x weight_decay
            if lr * self.weight_decay >= 1:
                raise UserError(f"weight_decay ({self.weight_decay:g}) times {name} ({lr:g}) must "
                                "be below 1: each step multiplies the weights by 1 - "
                                f"{name} x weight_decay")


SPLIT_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}


def split_ends(spec: str, tokens: int | None) -> tuple[int, int, int]:
    """Where the train, val and test parts of a corpus of `tokens` end (test empty when `spec`
    names two parts); with `tokens` None, only `spec` is checked. Fractions leave the rest of
    the corpus to the last part, so "0.9,0.1" splits as int(0.9 * tokens)."""
    parts = spec.split(",")
    counts = [p.strip().upper() for p in parts]
    bad = UserError(f"--split {spec}: give train,val or train,val,test as fractions that sum to "
                    "1 (0.9,0.1) or as token counts (90M,5M,5M)")
    if len(parts) not in (2, 3):
        raise bad
    try:
        if all(c[-1:] in SPLIT_UNITS or c.isdigit() for c in counts):
            sizes = [int(c[:-1]) * SPLIT_UNITS[c[-1]] if c[-1] in SPLIT_UNITS else int(c)
                     for c in counts]
            fractions = None
        else:
            fractions = [float(c) for c in counts]
    except ValueError:
        raise bad from None
    if fractions is not None:
        if not all(0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
            raise bad
        if fractions[0] == 0 or fractions[1] == 0:
            raise UserError(f"--split {spec}: the train and val parts must not be empty")
        if tokens is None:
            return 0, 0, 0
        train = int(fractions[0] * tokens)
        val = tokens if len(parts) == 2 else int((fractions[0] + fractions[1]) * tokens)
        return train, val, tokens
    if sizes[0] == 0 or sizes[1] == 0:
        raise UserError(f"--split {spec}: the train and val parts must not be empty")
    if tokens is not None and sum(sizes) > tokens:
        raise UserError(f"--split {spec} takes {sum(sizes):,} tokens but the corpus has "
                        f"{tokens:,}")
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return ends[0], ends[1], ends[-1]


@dataclass
class SampleConfig:
    max_new_tokens: int = _f(500, "characters to generate", at_least=0)
    temperature: float = _f(0.8, "sampling temperature; 0 picks the most likely character",
                            at_least=0.0)
    top_k: int | None = _f(None, "sample only among the K most likely characters", at_least=1)
    top_p: float | None = _f(None, "sample only among the most likely characters that make up "
                                   "P of the probability", above=0.0, at_most=1.0)
    cache: str = _f("shift", "key/value cache: shift (constant cost per character), exact (the "
                             "same characters as off), off (re-run the context every step)",
                    choices=("shift", "exact", "off"))
    seed: int = _f(1337, "random seed", at_least=0, below=SEED_LIMIT)
    num_samples: int = _f(1, "samples to draw", at_least=1)

    def validate(self) -> None:
        check_values(type(self), vars(self))


PRESETS: dict[str, dict] = {
    # nanoGPT's shakespeare-char recipe, with Muon at 0.02 for the blocks' matrices: ahead of
    # AdamW from the first evaluation of a short CPU sweep (benchmarks/results/shakespeare-char-
    # sweep-*), at cpu-baby's best rate. --optimizer adamw is nanoGPT's exactly.
    "shakespeare-char": dict(optimizer="muon"),
    # nanoGPT's small CPU recipe, with Muon for the blocks' matrices and AdamW at 3e-3 for the
    # rest: the best of the optimizers and rates measured (benchmarks/results/cpu-baby-sweep-*).
    # --optimizer adamw --lr 1e-3 is nanoGPT's exactly.
    "cpu-baby": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
        batch_size=12, max_iters=2000, lr_decay_iters=2000, eval_iters=20,
        optimizer="muon", lr=3e-3, muon_lr=0.02, muon_ns_steps=3,
    ),
    # The first model of the lesson: next character from the current one alone.
    "bigram": dict(
        model="bigram", block_size=8, dropout=0.0,
        batch_size=32, max_iters=3000, lr=1e-2, min_lr=1e-3, warmup_iters=0,
        lr_decay_iters=3000, weight_decay=0.0, eval_interval=300,
    ),
}


def fields_of(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def refuse_unused(model: str | None, optimizer: str | None, given: dict) -> None:
    """UserError if `given` sets a field that a run of `model` with `optimizer` has no use for
    (a flag that would be silently ignored), or if it asks Muon to train the bigram model. None:
    not known yet (the preset will tell)."""
    if model == "bigram" and optimizer == "muon":
        raise UserError("--optimizer muon trains the weight matrices inside transformer blocks, "
                        "and the bigram model (a vocab x vocab table) has none; use --optimizer "
                        "adamw, or --model gpt")

    def flags(cls, mark: str) -> list[str]:
        return [f"--{f.name.replace('_', '-')}" for f in fields_of(cls)
                if f.metadata.get(mark) and given.get(f.name) is not None]

    if model == "bigram" and (unused := flags(ModelConfig, "gpt_only")):
        one = len(unused) == 1
        raise UserError(f"{', '.join(unused)} do{'es' if one else ''} not apply to the bigram "
                        f"model (a vocab x vocab table); leave {'it' if one else 'them'} out, or "
                        "pass --model gpt")
    if optimizer not in (None, "muon") and (unused := flags(TrainConfig, "muon_only")):
        raise UserError(f"{', '.join(unused)} applies to --optimizer muon only, and this run's "
                        f"optimizer is {optimizer}; leave it out, or pass --optimizer muon")


def from_preset(name: str, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """Both configs for a named preset, with `overrides` (any field of either) applied. A
    `max_iters` override scales the preset's warm-up and decay with it, each unless given."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**PRESETS[name], **given}
    model_names = {f.name for f in fields_of(ModelConfig)}
    train_names = {f.name for f in fields_of(TrainConfig)}
    unknown = set(values) - model_names - train_names
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    if "max_iters" in given:  # the schedule keeps its shape: warm-up and decay scale with it
        check_values(TrainConfig, given)
        preset = TrainConfig(**{k: v for k, v in PRESETS[name].items() if k in train_names})
        for key in ("warmup_iters", "lr_decay_iters"):
            if key not in given:
                values[key] = round(getattr(preset, key) * given["max_iters"]
                                    / max(1, preset.max_iters))
    if values.get("model") == "bigram" and "optimizer" not in given:
        values["optimizer"] = "adamw"  # a preset's Muon: the bigram model has no matrices for it
    refuse_unused(values.get("model", ModelConfig.model),
                  values.get("optimizer", TrainConfig.optimizer), given)
    model = ModelConfig(**{k: v for k, v in values.items() if k in model_names})
    train = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    model.validate()
    train.validate()
    return model, train
