"""The settings of each stage: one frozen dataclass per command, passed by keyword, no torch.

Every default lives here (the CLI's option defaults are read from these classes), and choice-valued
fields are Literal types checked once, when a settings object is built (config.check_choices), with
the flag's name in the error. Training is configured by the recipe (config.py), not here.

    SampleSettings       what changes the images (recorded in samples.jsonl): `fluid sample`,
                         `fluid eval-geneval`, `fluid bench sample`, the demo
    SampleRunSettings    `fluid sample`: checkpoint, prompts, output, batching, device
    ShardingSettings     how `tokenize` / `encode-text` split their output into shards
    TokenizeSettings, EncodeTextSettings, EvalFidSettings, GenevalSettings, DemoSettings

To add a sampling option: a field of SampleSettings here, the option in cli/sample.py that fills
it, and the sampler code that reads it (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluid_cli.config import (
    CfgSchedule,
    Device,
    DiscreteOrder,
    FidMode,
    HeadTokens,
    Sampler,
    Weights,
    check_choices,
)


class _Checked:
    """Choice fields are checked as the object is built: a bad value is one `error:` line."""

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class SampleSettings(_Checked):
    """Every setting that changes the images (recorded in the samples manifest)."""

    steps: int = 64  # random-order AR steps K (raster always takes L steps)
    diffusion_steps: int = 100  # S: respaced steps of the per-token diffusion (1000 at training)
    cfg: float = 3.0  # classifier-free guidance scale; 1 = no guidance (half the compute)
    cfg_schedule: CfgSchedule = "linear"  # linear: MAR / Muse, 1 + (cfg-1) x fraction generated
    temperature: float = 1.0  # continuous: scales the diffusion noise; discrete: divides the logits
    top_k: int = 0  # discrete: keep the k most likely codes (0 = all)
    sampler: Sampler = "ddpm"  # per-token diffusion sampler (ddim: eta 0, ignores temperature)
    discrete_order: DiscreteOrder = "random"  # random (the paper) | confidence (MaskGIT: keep the surest)
    head_tokens: HeadTokens = "chosen"  # chosen: head on this step's tokens; all: every token (one shape)
    # continuous: clamp the head's predicted x0 to +-clip_x0 (None: the checkpoint's data range,
    # recorded at training; 0: off, MAR's unclipped sampler). See docs/sampling.md.
    clip_x0: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleRunSettings(_Checked):
    """`fluid sample`: which checkpoint and prompts, where to, and how (none of it changes an image
    except the seed and the weights, which the manifest records beside `sampling`)."""

    checkpoint: Path  # a run dir (its latest committed checkpoint) or a checkpoint dir
    out: Path
    prompts_file: str | None = None  # one prompt a line; "-": stdin
    prompts: tuple[str, ...] = ()  # --prompt, instead of (or after) the file
    sampling: SampleSettings = field(default_factory=SampleSettings)
    seed: int = 0  # image (prompt p, image i) is keyed by (seed, p, i)
    batch_size: int = 16  # speed only: images are identical at any batch size
    images_per_prompt: int = 1
    text_embeddings: Path | None = None  # an encode-text artifact instead of running T5
    grid: bool = False  # also write grid.png
    device: Device = "auto"
    weights: Weights = "ema"
    compile: bool = False
    max_images: int | None = None  # make at most this many new images, then stop


@dataclass(frozen=True)
class ShardingSettings:
    """How a data stage splits its output: record slots per shard, and this process's part."""

    records_per_shard: int = 1024
    num_shards: int | None = None  # None: torchrun's WORLD_SIZE (or 1)
    shard_index: int | None = None  # None: torchrun's RANK (or 0)


@dataclass(frozen=True)
class TokenizeSettings(_Checked):
    """`fluid tokenize`: images -> VAE latents or VQ codes."""

    sources: tuple[str, ...]
    tokenizer: str  # hub id or local dir of a diffusers AutoencoderKL or VQModel
    out: Path
    resolution: int = 256
    images_dir: Path | None = None
    batch_size: int = 32
    device: Device = "auto"
    sharding: ShardingSettings = field(default_factory=ShardingSettings)
    flip: bool = True  # also store the horizontally flipped image's tokens


@dataclass(frozen=True)
class EncodeTextSettings(_Checked):
    """`fluid encode-text`: captions -> T5 hidden states."""

    sources: tuple[str, ...]
    encoder: str  # hub id or local dir of a T5 encoder and its tokenizer
    out: Path
    max_length: int = 128
    images_dir: Path | None = None
    batch_size: int = 64
    device: Device = "auto"
    sharding: ShardingSettings = field(default_factory=ShardingSettings)
    check_images: bool = True  # skip records whose image is missing or corrupt, as tokenize does
    coco_caption: int = 0  # which caption of a COCO image, in annotation order


@dataclass(frozen=True)
class EvalFidSettings(_Checked):
    """`fluid eval-fid`: generated images against reference statistics."""

    images: Path | None = None
    ref: Path | None = None
    ref_images: Path | None = None
    ref_list: Path | None = None
    make_ref: bool = False
    out: Path | None = None  # default: IMAGES/fid.json
    run_dir: Path | None = None
    mode: FidMode = "clean"
    inception: Path | None = None
    expect_count: int | None = None
    step: int | None = None
    batch_size: int = 32
    device: Device = "auto"
    workers: int = 0


@dataclass(frozen=True)
class GenevalSettings(_Checked):
    """`fluid eval-geneval`: generate with `sample` (its checkpoint and out are set per run), or
    take `images`; then score."""

    checkpoint: Path | None = None
    images: Path | None = None
    out: Path | None = None
    run_dir: Path | None = None
    detector: str = "facebook/mask2former-swin-small-coco-instance"  # or py:MODULE:FUNCTION, or shapes
    clip: str = "openai/clip-vit-large-patch14"  # or py:MODULE:FUNCTION
    prompts: Path | None = None  # a GenEval-schema .jsonl instead of the 553 prompts
    allow_incomplete: bool = False
    step: int | None = None
    device: Device = "auto"  # sampling, detector and CLIP
    sampling: SampleSettings = field(default_factory=SampleSettings)
    seed: int = SampleRunSettings.seed
    batch_size: int = SampleRunSettings.batch_size
    text_embeddings: Path | None = None
    weights: Weights = SampleRunSettings.weights


@dataclass(frozen=True)
class DemoSettings:
    """`fluid demo`: the whole pipeline on the shapes world within a time budget."""

    out: Path = Path("runs/demo")
    minutes: float = 15.0
    records: int = 10000
    size: str = "tiny"
    seed: int = 0
    tokenizer_steps: int | None = None  # None: train-tokenizer's default
    sample_steps: int = 16  # K, at most the 16 tokens
    # the demo's flow head: guidance 5 scored 0.405 vs 0.372 at 3 (two seeds of 330 images, docs/demo.md)
    cfg: float = 5.0
