"""ModelConfig: everything needed to rebuild a model, saved as a checkpoint's config.json["model"].

Shapes come from two places: the registry (depth / width / heads of a size, the variant's token kind
and order) and the data manifests (token count, token channels or vocabulary, text width and length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fluid_cli.registry import PAPER_DATA, get_size, get_variant


def head_output_dim(token_dim: int, prediction: str) -> int:
    """Width of the diffusion head's output: 2·token_dim for Gaussian diffusion ([eps, v or x0 |
    variance interpolant]), token_dim for rectified flow (the velocity: no variance to learn)."""
    return token_dim if prediction == "flow" else 2 * token_dim


@dataclass(frozen=True)
class ModelConfig:
    variant: str
    size: str
    depth: int
    width: int
    heads: int
    mlp_ratio: int
    aligner_depth: int
    head_depth: int
    token_grid: tuple[int, int]  # (h, w) grid of image tokens; 16x16 = 256 tokens in the paper
    token_channels: int  # continuous: latent channels x patch^2 (4 x 2 x 2 = 16); 0 for discrete
    vocab_size: int  # discrete: VQ codebook size (8192 in the paper); 0 for continuous
    text_dim: int  # T5 hidden size (4096 for T5-XXL)
    text_len: int  # max text tokens (128 in the paper)
    latent_channels: int = 4  # continuous: channels of the VAE latent before 2x2 grouping
    patch: int = 2  # continuous: latent pixels grouped per token side
    diffusion_steps: int = 1000  # training steps of the per-token diffusion (cosine schedule)
    diffusion_batch_mul: int = 4  # MAR's diffusion_batch_mul: noise draws per token per step
    head_prediction: str = "eps"  # what the diffusion head predicts: "eps" (MAR), "v", "x0" or "flow"
    head_width_override: int = 0  # diffusion head width; 0 = the backbone's width

    @property
    def head_width(self) -> int:
        return self.head_width_override or self.width

    @property
    def num_tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    @property
    def continuous(self) -> bool:
        return get_variant(self.variant).continuous

    @property
    def random_order(self) -> bool:
        return get_variant(self.variant).random_order

    @classmethod
    def build(cls, variant: str, size: str, **data) -> ModelConfig:
        """Registry shapes for (variant, size) plus data shapes (defaults: the paper's data)."""
        v, s = get_variant(variant), get_size(size)
        grid = data.pop("token_grid", None)
        if grid is None:
            side = int(PAPER_DATA["num_tokens"] ** 0.5)
            grid = (side, side)
        latent_channels = data.pop("latent_channels", 4)
        patch = data.pop("patch", 2)
        cont = v.continuous
        vocab = int(data.pop("vocab_size", PAPER_DATA["vocab_size"]))
        return cls(
            variant=v.name,
            size=s.name,
            depth=s.depth,
            width=s.width,
            heads=s.heads,
            mlp_ratio=s.mlp_ratio,
            aligner_depth=s.aligner_depth,
            head_depth=s.head_depth,
            head_width_override=data.pop("head_width_override", 0) or s.head_width,
            token_grid=tuple(grid),
            token_channels=latent_channels * patch * patch if cont else 0,
            vocab_size=0 if cont else vocab,
            text_dim=int(data.pop("text_dim", PAPER_DATA["text_dim"])),
            text_len=int(data.pop("text_len", PAPER_DATA["text_len"])),
            latent_channels=latent_channels,
            patch=patch,
            **data,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_grid"] = list(self.token_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["token_grid"] = tuple(kw["token_grid"])
        return cls(**kw)
