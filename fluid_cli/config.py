"""Recipes: TOML files and `--set section.key=value` overrides, checked against typed dataclasses;
and the choice-valued settings of every stage (Literal types, checked by `check_choices`).

Each section is a frozen dataclass and each component receives only its own section (torchtitan's
lesson). Unknown sections or keys and wrong types are errors that list the valid ones. Precedence:
defaults < recipe file < explicit CLI flags < --set. `fluid train --recipe recipes/tiny.toml` runs one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (pyproject asks for it there)
    import tomli as tomllib

from fluid_cli.errors import FluidError
from fluid_cli.registry import get_size, get_variant

# ---- choice-valued settings: the values are the type, listed by `choices`, checked by check_choices --
Device = Literal["auto", "cuda", "xla", "mps", "cpu"]
Precision = Literal["auto", "bf16", "fp32"]  # auto: bf16 on accelerators, fp32 on cpu
Parallel = Literal["auto", "ddp", "fsdp"]  # auto: fsdp for sizes >= 3.1b, else ddp
Checkpointing = Literal["auto", "on", "off"]  # auto: on with fsdp
HeadPrediction = Literal["eps", "v", "x0", "flow"]  # gaussian_diffusion.py; flow: flow_matching.py
CfgSchedule = Literal["constant", "linear"]
Sampler = Literal["ddpm", "ddim"]
DiscreteOrder = Literal["random", "confidence"]
HeadTokens = Literal["chosen", "all"]
Weights = Literal["ema", "model"]
FidMode = Literal["clean", "legacy_pytorch", "legacy_tensorflow"]  # clean-fid's resize modes


def choices(kind: Any) -> tuple[str, ...]:
    """The values of a choice type: choices(Sampler) == ('ddpm', 'ddim'); for CLI help and errors."""
    return get_args(kind)


def check_choices(settings: Any, where: str = "--") -> None:
    """Every Literal-typed field of a settings dataclass holds one of its values, else one error
    line naming it as a flag (where="--": `--cfg-schedule 'x' is not one of constant, linear`) or as
    a recipe key (where="runtime.": `runtime.parallel 'x' is not one of auto, ddp, fsdp`). The one
    place choices are validated: each settings class calls it from __post_init__."""
    hints = get_type_hints(type(settings))
    for f in fields(settings):
        valid = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
        value = getattr(settings, f.name)
        if valid and value not in valid:
            name = f"--{f.name.replace('_', '-')}" if where == "--" else f"{where}{f.name}"
            raise FluidError(f"{name} {value!r} is not one of {', '.join(valid)}")


class _Section:
    """A recipe section: its choice keys are checked whenever it is built (defaults, file, --set)."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_choices(self, f"{self.name}.")


@dataclass(frozen=True)
class ModelSection(_Section):
    name: ClassVar[str] = "model"
    variant: str = "rand-cont"
    size: str = "tiny"
    diffusion_batch_mul: int = 4  # MAR's default: 4 noise draws per token per step
    # "eps" as MAR; "v" or "x0" (JiT) weight the high-noise steps where the condition decides a
    # token's content (docs/shapes.md, docs/demo.md); the paper recipes keep eps
    head_prediction: HeadPrediction = "eps"
    head_width: int = 0  # diffusion head width (MAR sizes it apart from the backbone); 0 = backbone width


@dataclass(frozen=True)
class DataSection:
    image_tokens: str = ""  # artifact dir written by `fluid tokenize`
    text: str = ""  # artifact dir written by `fluid encode-text`
    val_image_tokens: str = ""  # held-out artifacts for the validation loss (empty: a split of train)
    val_text: str = ""
    val_records: int = 256  # records held out of the training data when no val artifacts are given
    num_workers: int = 0
    max_bad_records: int = 100  # stop past this many unreadable or malformed records


@dataclass(frozen=True)
class TrainSection:
    steps: int = 1000
    batch_size: int = 32  # global batch (the paper: 2048; 4096 for 10.5B)
    micro_batch_size: int = 0  # per process and forward; 0 = the whole per-process batch
    lr: float = 1e-4
    warmup_steps: int = 100  # the paper: 65K steps linear warmup, then constant
    # warmup-stable-decay: decay linearly to 0 over this last fraction of the run (of steps, or of
    # time_limit_min when that ends it first); 0 = the paper's constant LR (its runs are not annealed)
    decay_fraction: float = 0.0
    weight_decay: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    cfg_dropout: float = 0.1  # text replaced by the empty caption (MAR's label drop rate: 0.1)
    seed: int = 0
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 4
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    time_limit_min: float = 0.0  # stop cleanly (with a checkpoint) after this many minutes; 0 = off


@dataclass(frozen=True)
class RuntimeSection(_Section):
    name: ClassVar[str] = "runtime"
    device: Device = "auto"
    precision: Precision = "auto"
    compile: bool = False
    preempt_budget_s: float = 30.0
    parallel: Parallel = "auto"  # multi-process wrapping (train/distributed.py)
    activation_checkpointing: Checkpointing = "auto"


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)


_SECTIONS = {f.name: f.type for f in fields(Recipe)}
_SECTION_TYPES = get_type_hints(Recipe)


def _check_value(section: str, key: str, value: Any, typ: type) -> Any:
    where = f"{section}.{key}"
    if get_origin(typ) is Literal:  # a choice: a string here, its value checked by the section
        typ = str
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool) or typ is not bool and isinstance(value, bool):
        raise FluidError(f"recipe key {where} must be {typ.__name__}, got {value!r}")
    if not isinstance(value, typ):
        raise FluidError(f"recipe key {where} must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(recipe: Recipe, overrides: dict[str, dict[str, Any]], origin: str) -> Recipe:
    updates = {}
    for section, values in overrides.items():
        if section not in _SECTIONS:
            raise FluidError(
                f"unknown recipe section [{section}] in {origin}; valid sections: {', '.join(_SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise FluidError(f"[{section}] in {origin} must be a table of keys")
        current = getattr(recipe, section)
        all_hints = get_type_hints(type(current))
        hints = {f.name: all_hints[f.name] for f in fields(current)}  # not the ClassVar `name`
        for key, value in values.items():
            if key not in hints:
                raise FluidError(
                    f"unknown recipe key {section}.{key} in {origin}; valid keys of [{section}]: {', '.join(hints)}"
                )
            values[key] = _check_value(section, key, value, hints[key])
        updates[section] = replace(current, **values)
    return replace(recipe, **updates)


def load_recipe(path: str | Path | None) -> Recipe:
    recipe = Recipe()
    if path is None:
        return recipe
    p = Path(path)
    if not p.is_file():
        raise FluidError(f"recipe {p} not found; see recipes/ for the shipped ones")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FluidError(f"recipe {p} is not valid TOML: {e}") from None
    return _apply(recipe, data, str(p))


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """['train.lr=3e-4', 'model.size=166m'] -> {'train': {'lr': 3e-4}, 'model': {'size': '166m'}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise FluidError(f"--set {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        lhs, raw = item.split("=", 1)
        section, key = lhs.strip().split(".", 1)
        try:  # TOML literal first (numbers, booleans, quoted strings); bare words are strings
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out


# (low, high) per numeric key, both inclusive; None: unbounded. Checked after every override, so a
# value torch would reject later (lr=nan, batch_size=0) is one line naming the key instead.
_RANGES = {
    "model.diffusion_batch_mul": (1, None),
    "model.head_width": (0, None),
    "data.val_records": (0, None),
    "data.num_workers": (0, None),
    "data.max_bad_records": (0, None),
    "train.steps": (0, None),
    "train.batch_size": (1, None),
    "train.micro_batch_size": (0, None),
    "train.warmup_steps": (0, None),
    "train.weight_decay": (0.0, None),
    "train.beta1": (0.0, 1.0),
    "train.beta2": (0.0, 1.0),
    "train.grad_clip": (0.0, None),
    "train.ema_decay": (0.0, 1.0),
    "train.cfg_dropout": (0.0, 1.0),
    "train.decay_fraction": (0.0, 1.0),
    "train.log_every": (1, None),
    "train.val_every": (0, None),
    "train.val_batches": (0, None),
    "train.ckpt_every": (0, None),
    "train.keep_checkpoints": (1, None),
    "train.max_bad_steps": (1, None),
    "train.time_limit_min": (0.0, None),
    "runtime.preempt_budget_s": (0.0, None),
}


def _check_ranges(recipe: Recipe) -> None:
    import math

    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if isinstance(value, float) and not math.isfinite(value):
                raise FluidError(f"recipe key {name} must be a finite number, got {value}")
            low, high = _RANGES.get(name, (None, None))
            if low is not None and value < low or high is not None and value > high:
                span = f"at least {low}" if high is None else f"between {low} and {high}"
                raise FluidError(f"recipe key {name} must be {span}, got {value}")
    if recipe.train.lr <= 0:
        raise FluidError(f"recipe key train.lr must be positive, got {recipe.train.lr}")
    for beta in ("beta1", "beta2"):
        if getattr(recipe.train, beta) >= 1:
            raise FluidError(f"recipe key train.{beta} must be below 1, got {getattr(recipe.train, beta)}")


def resolve(path: str | Path | None, flags: dict[str, dict[str, Any]], sets: list[str]) -> Recipe:
    """defaults < recipe file < CLI flags (None = not given) < --set; then validate names."""
    recipe = load_recipe(path)
    given = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in flags.items()}
    recipe = _apply(recipe, {s: kv for s, kv in given.items() if kv}, "command-line flags")
    recipe = _apply(recipe, parse_set(sets), "--set")
    get_variant(recipe.model.variant)
    get_size(recipe.model.size)
    _check_ranges(recipe)
    t = recipe.train
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        raise FluidError(
            f"train.batch_size {t.batch_size} is not a multiple of micro_batch_size {t.micro_batch_size}"
        )
    return recipe
