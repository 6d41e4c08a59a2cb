"""Typed hyperparameters: one dataclass per concern, turned into the flags of `python -m lth.train`.

Every field carries its help text, its flag, how a value is parsed (from the command line or from a
JSON/YAML file) and how it is checked, so `--help`, `--config FILE` and validation all come from
here. A run is named by a hash of the settings that differ from these defaults (fields marked
`hashed=False` -- where the output goes, progress bars, threads -- do not change what a run computes
and are left out of the hash).

Methods and modifiers add their own sections without editing this file: `register_section(name)`
on a dataclass of `hp` fields makes them flags (in a "<name> settings" group of --help), keys of
`--config` files (nested under <name>, or flat by flag name) and `config.<name>.<field>`; like
every setting, they join the run hash only when not at their default, so registering a section
leaves the names of existing run folders unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from sparsekern.formats import BLOCK_SIZES


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag."""


# ----------------------------------------------------------------------------- value parsers
# Each takes what the command line or a config file gives (a string, or a JSON value) and returns
# the canonical typed value, or raises ValueError with a message saying what is expected.

def _int(v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    try:
        return int(str(v).strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {v!r}") from None


def _float(v) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {v!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {v!r}")
    return out


def _optional_float(v) -> float | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
        return None
    return _float(v)


def _optional_int(v) -> int | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
        return None
    return _int(v)


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _str(v) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise ValueError(f"expected a string, got {v!r}")
    return str(v)


def _split(v, seps=",") -> list[str]:
    if isinstance(v, (list, tuple)):
        return [str(x).strip() for x in v]
    s = str(v).strip()
    for sep in seps[1:]:
        s = s.replace(sep, seps[0])
    return [p.strip() for p in s.split(seps[0]) if p.strip()]


def _ints(v) -> tuple[int, ...]:
    parts = _split(v)
    try:
        out = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 1024,1024, got {v!r}") from None
    return out


def _positive_ints(v) -> tuple[int, ...]:
    out = _ints(v)
    if not out or any(x < 1 for x in out):
        raise ValueError(f"expected one or more positive integers like 1024,1024, got {v!r}")
    return out


def _shape(v) -> tuple[int, ...]:
    parts = _split(v, seps="x,")
    try:
        out = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected a shape like 3x32x32, got {v!r}") from None
    if not out or any(x < 1 for x in out):
        raise ValueError(f"expected a shape of positive sizes like 3x32x32, got {v!r}")
    return out


def _block(v) -> tuple[int, int]:
    out = _shape(v)
    if len(out) == 1:
        out = (out[0], out[0])
    if len(out) != 2 or any(b not in BLOCK_SIZES for b in out):
        raise ValueError(f"expected BNxBK (output x input features) with each of "
                         f"{'/'.join(map(str, BLOCK_SIZES))} (sparsekern's BSR block sizes), "
                         f"got {v!r}")
    return out


def _nm(v) -> tuple[int, int]:
    parts = _split(v, seps=":,")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected N:M like 2:4, got {v!r}") from None
    if not 0 < n < m:
        raise ValueError(f"expected N:M with 0 < N < M (keep N of every M), got {v!r}")
    return n, m


def _names(v) -> tuple[str, ...]:
    parts = _split(v)
    if parts in ([], ["none"]):
        return ()
    return tuple(parts)


def _rewind_point(v) -> str:
    s = str(v).strip().lower()
    m = re.fullmatch(r"(\d+)\s*(ep|it)?", s)
    if not m:
        raise ValueError(f"expected a training point like 0, 20it (iterations) or 1ep (epochs), "
                         f"got {v!r}")
    return f"{int(m.group(1))}{m.group(2) or 'it'}"


def _branch_rounds(v) -> str:
    s = ",".join(_split(v)).lower()
    if s in ("last", "all", "none", ""):
        return s or "none"
    try:
        rounds = sorted({int(p) for p in s.split(",")})
    except ValueError:
        raise ValueError(f"expected last, all, none or comma-separated round numbers, got "
                         f"{v!r}") from None
    return ",".join(map(str, rounds))


# ----------------------------------------------------------------------------- field helper

def hp(default, help: str, *, flag: str | None = None, parse: Callable[[Any], Any] | None = None,
       choices: Callable[[], list[str]] | tuple | None = None,
       check: Callable[[Any], str | None] | None = None, hashed: bool = True,
       metavar: str | None = None):
    """A hyperparameter: its default, help text, flag (default --field-name), parser (default
    from the default's type), choices, a check returning an error message, and whether it takes
    part in the run hash."""
    return field(default=default, metadata=dict(help=help, flag=flag, parse=parse,
                                                choices=choices, check=check, hashed=hashed,
                                                metavar=metavar))


def _at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v}"


def _in_open(lo, hi):
    return lambda v: None if lo < v < hi else f"must be in ({lo}, {hi}), got {v}"


def _nonneg(v):
    return None if v >= 0 else f"must be >= 0, got {v}"


def _positive(v):
    return None if v > 0 else f"must be > 0, got {v}"


def _optional_in_open(lo, hi):
    return lambda v: None if v is None or lo < v < hi else f"must be in ({lo}, {hi}), got {v}"


def _model_names():
    from lth.models import MODELS
    return MODELS.names()


def _dataset_names():
    from lth.datasets import DATASETS
    return DATASETS.names()


def _pruning_names():
    from lth.pruning import STRATEGIES
    return STRATEGIES.names()


def _method_names():
    from lth.methods import METHODS
    return METHODS.names()


def _branch_names():
    from lth.methods import BRANCHES
    return BRANCHES.names()


def _check_branches(v):
    known = _branch_names()
    bad = [b for b in v if b not in known]
    return f"unknown branch {bad}; known: {', '.join(known)}" if bad else None


# ----------------------------------------------------------------------------- sections

@dataclass
class DatasetHparams:
    name: str = hp("digits", "dataset", flag="--dataset", choices=_dataset_names)
    data_dir: str = hp("data", "folder holding downloaded datasets (cifar10/cifar100/imagefolder)",
                       hashed=False)
    download: bool = hp(False, "allow torchvision to download cifar10/cifar100 into --data-dir",
                        hashed=False)
    augment: bool = hp(True, "random crop + horizontal flip for cifar/imagefolder training "
                       "(digits and synthetic are never augmented)")
    image_size: int = hp(224, "imagefolder: training crop / test resize size in pixels",
                         check=_at_least(8))
    synthetic_shape: tuple = hp((3, 32, 32), "synthetic: input shape CxHxW",
                                parse=_shape, metavar="CxHxW")
    synthetic_classes: int = hp(10, "synthetic: number of classes", check=_at_least(2))
    synthetic_train: int = hp(2048, "synthetic: training examples", check=_at_least(1))
    synthetic_test: int = hp(512, "synthetic: test examples", check=_at_least(1))
    num_workers: int = hp(0, "DataLoader worker processes (cifar/imagefolder)", check=_nonneg,
                          hashed=False)


@dataclass
class ModelHparams:
    name: str = hp("mlp", "model", flag="--model", choices=_model_names)
    widths: tuple = hp((1536, 1536), "mlp: hidden layer widths, comma-separated",
                       parse=_positive_ints, metavar="W1,W2,...")
    width_mult: float = hp(1.0, "conv nets: channel width multiplier", check=_positive)
    init: str = hp("kaiming_normal", "weight initialisation of linear and conv layers",
                   choices=("kaiming_normal", "kaiming_uniform", "xavier_normal", "torch"))


@dataclass
class TrainingHparams:
    optimizer: str = hp("sgd", "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = hp(0.05, "peak learning rate", check=_positive)
    momentum: float = hp(0.9, "SGD momentum", check=lambda v: None if 0 <= v < 1 else
                         f"must be in [0, 1), got {v}")
    nesterov: bool = hp(False, "SGD: Nesterov momentum")
    weight_decay: float = hp(1e-4, "L2 weight decay", check=_nonneg)
    batch_size: int = hp(128, "global batch size (split across DDP ranks)", check=_at_least(1))
    epochs: int = hp(12, "training epochs per round (the full budget of a ticket)",
                     check=_at_least(1))
    schedule: str = hp("cosine", "learning-rate schedule over the epochs of a round",
                       choices=("constant", "cosine", "multistep", "linear"))
    milestones: tuple = hp((), "multistep: epochs at which the lr is multiplied by --gamma",
                           parse=_ints, metavar="E1,E2,...")
    gamma: float = hp(0.1, "multistep: lr factor at each milestone", check=_positive)
    warmup_steps: int = hp(0, "linear lr warm-up iterations at the start of the schedule",
                           check=_nonneg)
    label_smoothing: float = hp(0.0, "cross-entropy label smoothing",
                                check=lambda v: None if 0 <= v < 1 else
                                f"must be in [0, 1), got {v}")
    seed: int = hp(0, "seed of the initialisation, data order and random baselines",
                   check=_nonneg)
    autocast: str = hp("none", "mixed precision: bf16 runs forward and loss (training, "
                       "evaluation, step timing) under torch.autocast in bfloat16; weights, "
                       "gradients and optimizer state stay float32", choices=("none", "bf16"))


@dataclass
class PruningHparams:
    strategy: str = hp("magnitude", "how weights are scored for pruning", flag="--pruning",
                       choices=_pruning_names)
    fraction: float = hp(0.2, "fraction of the remaining prunable weights removed per round",
                         flag="--prune-fraction", check=_in_open(0.0, 1.0))
    scope: str = hp("global", "rank weights across all prunable layers or within each layer",
                    flag="--prune-scope", choices=("global", "layerwise"))
    granularity: str = hp("unstructured", "pruning unit: single weights, whole blocks (run on "
                          "sparsekern's BSR kernels) or N:M groups along the input dimension",
                          choices=("unstructured", "block", "nm"))
    block: tuple = hp((32, 32), "granularity=block: block shape BNxBK (output x input features; "
                      "for a conv, output x input channels spanning the whole kh x kw window; "
                      "grouped/depthwise convs are then not pruned)",
                      parse=_block, metavar="BNxBK")
    nm: tuple = hp((2, 4), "granularity=nm: keep N of every M consecutive input weights; each "
                   "round removes --prune-fraction of the kept weights of a group (at least one) "
                   "until N remain", parse=_nm, metavar="N:M")
    exclude: tuple = hp(("first_conv", "classifier"), "weights never pruned: first_conv, "
                        "classifier, first_layer, or parameter/module names (glob patterns "
                        "allowed); none = prune all", flag="--prune-exclude", parse=_names,
                        metavar="A,B,...")
    target_sparsity: float | None = hp(None, "method=oneshot: sparsity reached in one prune; "
                                       "none = what --rounds rounds of --prune-fraction reach",
                                       parse=_optional_float,
                                       check=_optional_in_open(0.0, 1.0))


@dataclass
class MethodHparams:
    name: str = hp("imp", "ticket search method", flag="--method", choices=_method_names)
    rounds: int = hp(14, "pruning rounds after the dense round 0 (imp); 0.8^14 leaves 4.4%",
                     check=_nonneg)
    rewind: str = hp("weights", "what a pruned network restarts from: init (original LTH), "
                     "weights (weights at --rewind-to, Frankle et al. 2020), lr (trained weights, "
                     "lr schedule rewound to --rewind-to, Renda et al. 2020), finetune (trained "
                     "weights at the final lr)", choices=("init", "weights", "lr", "finetune"))
    rewind_to: str = hp("1ep", "rewind point for --rewind weights|lr: Nit (iterations) or Nep "
                        "(epochs)", parse=_rewind_point, metavar="N{it,ep}")
    finetune_epochs: int | None = hp(None, "rewind=finetune: epochs per round; none = "
                                     "--epochs", parse=_optional_int,
                                     check=lambda v: None if v is None or v >= 1 else
                                     f"must be >= 1, got {v}")
    finetune_lr: float | None = hp(None, "rewind=finetune: constant lr; none = the schedule's "
                                   "lr at the start of the last epoch", parse=_optional_float,
                                   check=lambda v: None if v is None or v > 0 else
                                   f"must be > 0, got {v}")
    branches: tuple = hp(("random_reinit",), "sanity-check branches trained with the ticket's "
                         "budget: random_reinit, random_ticket, shuffled; none = no branch",
                         parse=_names, check=_check_branches, metavar="B1,B2,...")
    branch_rounds: str = hp("last", "rounds that get the branches: last, all, none or a list "
                            "like 3,7", parse=_branch_rounds, metavar="ROUNDS")


@dataclass
class SparseHparams:
    format: str = hp("auto", "sparse format of pruned linear/conv layers: auto (BSR when the mask "
                     "is made of whole blocks, else CSR), bsr (needs --granularity block), csr",
                     flag="--sparse-format", choices=("auto", "bsr", "csr"))
    policy: str = hp("auto", "per pruned linear/conv layer: auto (time both, keep the faster), "
                     "sparse (always sparsekern kernels), dense (masked dense, the usual LTH "
                     "simulation)", flag="--sparse-policy", choices=("auto", "sparse", "dense"))
    timing_repeats: int = hp(15, "repeats of the interleaved dense/sparse step timing per round",
                             check=_at_least(1), hashed=False)
    timing_warmup: int = hp(3, "warm-up steps before timing", check=_nonneg, hashed=False)


@dataclass
class RunHparams:
    runs_dir: str = hp("runs", "where run folders are created", hashed=False)
    name: str = hp("", "run name prefix; empty = <method>_<model>_<dataset>. The folder "
                   "is <runs-dir>/<name>-<hash of non-default settings>", flag="--name",
                   hashed=False)
    progress: bool = hp(True, "tqdm progress bars with live loss/accuracy (when stderr is a "
                         "terminal)", hashed=False)
    device: str = hp("auto", "auto (cuda if available), cpu or cuda[:i]", hashed=False,
                     check=lambda v: None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else
                     f"must be auto, cpu or cuda[:i], got {v!r}")
    threads: int = hp(0, "torch CPU threads per process (0: all cores / processes per node)",
                      check=_nonneg, hashed=False)


SECTIONS: dict[str, type] = {
    "dataset": DatasetHparams,
    "model": ModelHparams,
    "training": TrainingHparams,
    "pruning": PruningHparams,
    "method": MethodHparams,
    "sparse": SparseHparams,
    "run": RunHparams,
}
_CORE_SECTIONS = tuple(SECTIONS)


SECTION_METHODS: dict[str, tuple[str, ...]] = {}  # section -> the methods it applies to


def register_section(name: str, methods: tuple[str, ...] = ()):
    """Class decorator: a dataclass of `hp` fields becomes the settings section `name` (see the
    module docstring). With `methods`, setting any of its flags with another --method is an
    error naming the flag. A section name or a flag that is already taken is an error."""
    def decorator(cls: type) -> type:
        if name in SECTIONS:
            raise ValueError(f"settings section {name!r} is registered twice")
        taken = {fl.option for fl in flags()}
        clash = [Flag(name, f).option for f in dataclasses.fields(cls)
                 if Flag(name, f).option in taken]
        if clash:
            raise ValueError(f"settings section {name!r}: flags {clash} already exist")
        SECTIONS[name] = cls
        if methods:
            SECTION_METHODS[name] = tuple(methods)
        return cls
    return decorator


def _registered_sections() -> dict:
    """Default instances of every section registered by a method or modifier module."""
    import lth.methods  # noqa: F401  (importing the package registers its sections)
    return {s: cls() for s, cls in SECTIONS.items() if s not in _CORE_SECTIONS}


@dataclass
class Config:
    dataset: DatasetHparams = field(default_factory=DatasetHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    pruning: PruningHparams = field(default_factory=PruningHparams)
    method: MethodHparams = field(default_factory=MethodHparams)
    sparse: SparseHparams = field(default_factory=SparseHparams)
    run: RunHparams = field(default_factory=RunHparams)
    # the registered sections, read as attributes: config.kd.alpha
    sections: dict = field(default_factory=_registered_sections, repr=False)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no setting section {name!r}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {s: {f.name: _jsonable(getattr(getattr(self, s), f.name))
                    for f in dataclasses.fields(SECTIONS[s])} for s in SECTIONS}

    def non_default(self) -> dict:
        """{"section.field": value} for every hashed setting that differs from its default."""
        out = {}
        for s, cls in SECTIONS.items():
            default = cls()
            for f in dataclasses.fields(cls):
                if not f.metadata["hashed"]:
                    continue
                v, d = getattr(getattr(self, s), f.name), getattr(default, f.name)
                if _jsonable(v) != _jsonable(d):
                    out[f"{s}.{f.name}"] = _jsonable(v)
        return out

    def hash(self) -> str:
        text = json.dumps(self.non_default(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def run_name(self) -> str:
        prefix = self.run.name or f"{self.method.name}_{self.model.name}_{self.dataset.name}"
        return f"{prefix}-{self.hash()}"

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Config":
        """Nested ({"training": {"lr": 0.1}}) or flat ({"lr": 0.1} / {"prune-fraction": 0.3})."""
        return make_config(flat_settings(data, source))


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


# ----------------------------------------------------------------------------- field table

@dataclass(frozen=True)
class Flag:
    section: str
    field: dataclasses.Field

    @property
    def option(self) -> str:
        return self.field.metadata["flag"] or "--" + self.field.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.option[2:].replace("-", "_")

    @property
    def default(self):
        return getattr(SECTIONS[self.section](), self.field.name)

    def choices(self) -> list[str] | None:
        c = self.field.metadata["choices"]
        return list(c()) if callable(c) else (list(c) if c else None)

    def convert(self, value):
        """Raw value (CLI string or file value) -> canonical value; ValueError explains."""
        parse = self.field.metadata["parse"]
        if parse is None:
            kind = type(self.default)
            parse = {bool: _bool, int: _int, float: _float, str: _str}[kind]
        value = parse(value)
        choices = self.choices()
        if choices is not None and value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        check = self.field.metadata["check"]
        msg = check(value) if check else None
        if msg:
            raise ValueError(msg)
        return value


def flags() -> list[Flag]:
    import lth.methods  # noqa: F401  (importing the package registers its sections)
    return [Flag(s, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _flag_index() -> dict[str, Flag]:
    index = {}
    for fl in flags():
        index[fl.dest] = fl
        index[f"{fl.section}.{fl.field.name}"] = fl
    return index


def flat_settings(data: dict, source: str = "config") -> dict[str, Any]:
    """A config-file mapping -> {dest: canonical value}. Section keys hold dicts of field names;
    other keys are flag names (with - or _). Unknown keys and bad values are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    index = _flag_index()
    out: dict[str, Any] = {}

    def put(key: str, fl: Flag | None, value):
        if fl is None:
            raise ConfigError(f"{source}: unknown setting {key!r} (see python -m lth.train "
                              f"--help)")
        try:
            out[fl.dest] = fl.convert(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {key} ({fl.option}): {e}") from None

    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():  # a field name, or a flag name of this section
                fl = index.get(f"{key}.{sub}") or index.get(str(sub).replace("-", "_"))
                put(f"{key}.{sub}", fl if fl is not None and fl.section == key else None, v)
        else:
            put(key, index.get(str(key).lstrip("-").replace("-", "_")), value)
    return out


def make_config(settings: dict[str, Any]) -> Config:
    """{dest: canonical value} -> a validated Config (missing settings keep their defaults)."""
    sections = {s: {} for s in SECTIONS}
    by_dest = {fl.dest: fl for fl in flags()}
    for dest, value in settings.items():
        fl = by_dest[dest]
        sections[fl.section][fl.field.name] = value
    config = Config(**{s: SECTIONS[s](**kw) for s, kw in sections.items()
                       if s in _CORE_SECTIONS},
                    sections={s: SECTIONS[s](**kw) for s, kw in sections.items()
                              if s not in _CORE_SECTIONS})
    validate(config)
    return config


def _fail(flag: str, msg: str):
    raise ConfigError(f"{flag}: {msg}")


def validate(c: Config) -> None:
    """Checks that involve more than one setting (single values are checked when parsed)."""
    for fl in flags():  # values built in code (not parsed) get the same checks
        try:
            fl.convert(_jsonable(getattr(getattr(c, fl.section), fl.field.name))
                       if fl.field.metadata["parse"] else
                       getattr(getattr(c, fl.section), fl.field.name))
        except ValueError as e:
            _fail(fl.option, str(e))
    p, m, t = c.pruning, c.method, c.training
    from lth.methods import METHODS, MODIFIERS
    if c.sparse.format == "bsr" and p.granularity != "block":
        _fail("--sparse-format", "bsr packs whole blocks: it needs --granularity block (an "
              "unstructured mask would train the pruned weights inside kept blocks); use auto "
              "or csr")
    method = METHODS.get(m.name)
    if p.target_sparsity is not None and not method.takes_target_sparsity:
        takers = [n for n in METHODS.names() if METHODS.get(n).takes_target_sparsity]
        _fail("--target-sparsity", f"applies to --method {' or '.join(takers)} only")
    for key in c.non_default():
        section = key.split(".")[0]
        if m.name not in SECTION_METHODS.get(section, (m.name,)):
            fl = Flag(section, {f.name: f for f in dataclasses.fields(SECTIONS[section])}[
                key.split(".")[1]])
            _fail(fl.option, f"applies to --method {' or '.join(SECTION_METHODS[section])} only")
    if not method.rewinds:
        rewinders = " or ".join(n for n in METHODS.names() if METHODS.get(n).rewinds)
        for key, flag in (("method.rewind", "--rewind"), ("method.rewind_to", "--rewind-to")):
            if key in c.non_default():
                _fail(flag, f"applies to --method {rewinders} only ({m.name} does not rewind)")
    method.check(c)
    for name in MODIFIERS.names():
        if MODIFIERS.get(name).enabled(c):
            MODIFIERS.get(name).check(c)
    if m.rewind in ("weights", "lr") and method.rewinds and last_round(c) >= 1:
        k, unit = int(m.rewind_to[:-2]), m.rewind_to[-2:]
        if unit == "ep" and k >= t.epochs:
            _fail("--rewind-to", f"{m.rewind_to} is not before the end of training "
                  f"(--epochs {t.epochs})")
    if m.rewind != "finetune":
        if m.finetune_epochs is not None:
            _fail("--finetune-epochs", "applies to --rewind finetune only")
        if m.finetune_lr is not None:
            _fail("--finetune-lr", "applies to --rewind finetune only")
    if t.schedule == "multistep":
        if not t.milestones:
            _fail("--milestones", "--schedule multistep needs milestones, e.g. 80,120")
    elif t.milestones:
        _fail("--milestones", "applies to --schedule multistep only")
    if any(e < 1 or e >= t.epochs for e in t.milestones):
        _fail("--milestones", f"each milestone must be an epoch in [1, {t.epochs}), got "
              f"{','.join(map(str, t.milestones))}")
    if len(set(m.branches)) != len(m.branches):
        _fail("--branches", f"repeated branch in {','.join(m.branches)}")
    if m.branches and m.branch_rounds != "none":
        last = last_round(c)
        if last < 1:
            _fail("--branches", "branches need at least one pruned round (--rounds >= 1)")
        if m.branch_rounds not in ("last", "all"):
            bad = [r for r in map(int, m.branch_rounds.split(",")) if not 1 <= r <= last]
            if bad:
                _fail("--branch-rounds", f"rounds {bad} are not pruned rounds (1..{last})")
    if t.optimizer != "sgd" and t.nesterov:
        _fail("--nesterov", "applies to --optimizer sgd only")


def last_round(c: Config) -> int:
    """Index of the last pruned round (0: dense only)."""
    from lth.methods import METHODS
    return METHODS.get(c.method.name).last_round(c)


def branch_rounds(c: Config) -> list[int]:
    if not c.method.branches or c.method.branch_rounds == "none":
        return []
    last = last_round(c)
    if c.method.branch_rounds == "last":
        return [last] if last >= 1 else []
    if c.method.branch_rounds == "all":
        return list(range(1, last + 1))
    return [int(r) for r in c.method.branch_rounds.split(",")]


def format_default(v, joiner: str = ",") -> str:
    if isinstance(v, tuple):
        return joiner.join(map(str, v)) if v else "none"
    if v is None:
        return "none"
    if v == "":
        return '""'
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)
