"""The one registry of model variants and sizes, shared by every stage and by the CLI's choices.

Sizes are the rows of the paper's Table 2 (blocks / width / heads) plus `tiny` for CI and the
embedded demo. Variants are the paper's 2x2 grid: token kind (continuous VAE latents with a
diffusion head, or discrete VQ codes with a tied softmax head) x order (random order with
bidirectional attention, or raster order with causal attention). `fluid models` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluid_cli.errors import FluidError


@dataclass(frozen=True)
class Variant:
    name: str
    tokens: str  # "continuous" | "discrete"
    order: str  # "random" | "raster"
    description: str

    @property
    def continuous(self) -> bool:
        return self.tokens == "continuous"

    @property
    def random_order(self) -> bool:
        return self.order == "random"


@dataclass(frozen=True)
class Size:
    name: str
    depth: int  # image transformer blocks
    width: int  # channels of the backbone, the text aligner and the diffusion head
    heads: int
    nominal_params: float | None  # the paper's name for the size (Table 2), None for tiny
    aligner_depth: int = 6  # "The text aligner consistently consists of 6 transformer blocks"
    head_depth: int = 6  # "The DiffLoss MLP also contains 6 MLP layers"
    mlp_ratio: int = 4  # "The MLP ratio is fixed at 4 for all models"
    paper_sec_per_image: float | None = None  # Table 2 sampling speed on TPU v5, per chip
    # diffusion head width, 0 = the backbone's (the paper does not give it; MAR sizes it apart,
    # 1024-1536 for 768-1280 wide models). The CPU sizes use 2x: at width 64 the head, not the
    # backbone, limited the tiny model (docs/demo.md)
    head_width: int = 0


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "rand-cont", "continuous", "random", "Fluid: random order, continuous tokens, diffusion head"
        ),
        Variant("rand-disc", "discrete", "random", "MaskGIT/Muse-style: random order, VQ codes"),
        Variant("rast-cont", "continuous", "raster", "GPT-style with a diffusion head on continuous tokens"),
        Variant("rast-disc", "discrete", "raster", "GPT-style (Parti/LlamaGen-like) on VQ codes"),
    ]
}

SIZES: dict[str, Size] = {
    s.name: s
    for s in [
        # tiny: a debug flavour that trains in seconds on a laptop CPU (CI, the embedded demo)
        Size(
            "tiny",
            depth=2,
            width=64,
            heads=4,
            nominal_params=None,
            aligner_depth=1,
            head_depth=2,
            head_width=128,
        ),
        # mini, small: the CPU study's larger sizes (recipes/shapes_study.py, docs/shapes-study.md)
        Size(
            "mini",
            depth=3,
            width=96,
            heads=4,
            nominal_params=None,
            aligner_depth=2,
            head_depth=2,
            head_width=192,
        ),
        Size(
            "small",
            depth=4,
            width=128,
            heads=4,
            nominal_params=None,
            aligner_depth=2,
            head_depth=3,
            head_width=256,
        ),
        Size("166m", depth=12, width=768, heads=12, nominal_params=166e6, paper_sec_per_image=0.047),
        Size("369m", depth=16, width=1024, heads=16, nominal_params=369e6, paper_sec_per_image=0.078),
        Size("665m", depth=20, width=1280, heads=16, nominal_params=665e6, paper_sec_per_image=0.110),
        Size("1.1b", depth=24, width=1536, heads=16, nominal_params=1.1e9, paper_sec_per_image=0.180),
        Size("3.1b", depth=32, width=2304, heads=24, nominal_params=3.1e9, paper_sec_per_image=0.483),
        Size("10.5b", depth=34, width=4096, heads=64, nominal_params=10.5e9, paper_sec_per_image=1.571),
    ]
}

# The paper's data: 256px images -> SD-VAE 4x32x32 latents grouped 2x2 -> 256 tokens of 16
# channels, or 16x16 VQ codes from a vocabulary of 8192; T5-XXL hidden states (4096 wide), at most
# 128 text tokens. Used by `fluid models` and `fluid bench` when no data manifest is given.
PAPER_DATA = {
    "num_tokens": 256,
    "token_channels": 16,
    "vocab_size": 8192,
    "text_dim": 4096,
    "text_len": 128,
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise FluidError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def get_size(name: str) -> Size:
    key = name.lower()
    if key not in SIZES:
        raise FluidError(f"unknown size {name!r}; valid sizes: {', '.join(SIZES)}")
    return SIZES[key]
