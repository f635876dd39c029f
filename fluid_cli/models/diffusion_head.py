"""Per-token diffusion head for continuous tokens (MAR's DiffLoss with its SimpleMLPAdaLN net).

Owns the small adaLN MLP that models p(token | condition vector) for each image token, its training
loss (hybrid diffusion loss on ``batch_mul`` noised copies of every token) and its sampler (respaced
DDPM with temperature and classifier-free guidance). The noise math lives in ``gaussian_diffusion``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fluid_cli.models.config import head_output_dim
from fluid_cli.models.flow_matching import RectifiedFlow
from fluid_cli.models.gaussian_diffusion import GaussianDiffusion, NoiseFn

FREQ_DIM = 256  # sinusoidal timestep features, as DiT / MAR


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (N, dim) of (possibly fractional) timesteps t (N,): [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class _ResBlock(nn.Module):
    """LayerNorm -> adaLN(shift, scale) -> Linear-SiLU-Linear -> gated residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class _FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """MLP denoiser eps_theta(x_t, t, z) with learned-range variance; outputs (N, 2·token_dim)."""

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int,
        depth: int = 6,
        num_train_steps: int = 1000,
        batch_mul: int = 4,
        prediction: str = "eps",
    ) -> None:
        super().__init__()
        self.token_dim, self.cond_dim, self.width, self.depth = token_dim, cond_dim, width, depth
        self.num_train_steps, self.batch_mul = num_train_steps, batch_mul
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.out_dim = head_output_dim(token_dim, prediction)
        self.final = _FinalLayer(width, self.out_dim)
        with torch.device("cpu"):  # host-side float64 tables, also when the model is built on meta
            self.train_diffusion = (
                RectifiedFlow(num_train_steps)
                if prediction == "flow"
                else GaussianDiffusion.cosine(num_train_steps, prediction)
            )
        # Respaced samplers by step count (plain attribute: schedule tables are not parameters).
        self._gen_diffusions: dict[int, GaussianDiffusion | RectifiedFlow] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR / DiT init: xavier linears, N(0, 0.02) time MLP, zeroed adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        # Zero adaLN: every block starts as identity; zero output: eps=0, v=0 (mid-range variance).
        for lin in [b.ada[-1] for b in self.blocks] + [self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @staticmethod
    def param_count(
        token_dim: int, cond_dim: int, width: int, depth: int = 6, out_dim: int | None = None
    ) -> int:
        """Closed-form number of parameters of a head with these sizes (out_dim: 2·token_dim unless
        given, token_dim for rectified flow)."""
        w, out_dim = width, out_dim or 2 * token_dim
        time = (FREQ_DIM * w + w) + (w * w + w)
        inputs = (cond_dim * w + w) + (token_dim * w + w)
        block = 2 * w + 2 * (w * w + w) + (w * 3 * w + 3 * w)  # LN affine, MLP, adaLN
        final = (w * 2 * w + 2 * w) + (w * out_dim + out_dim)  # adaLN, output
        return time + inputs + depth * block + final

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t (N, C), t (N,) training steps, cond (N, D) -> (N, out_dim): [eps | variance
        interpolant] for Gaussian diffusion, the velocity (N, C) for rectified flow."""
        h = self.input_proj(x_t)  # (N, W)
        c = self.time_embed(timestep_embedding(t).to(h.dtype)) + self.cond_embed(cond)  # (N, W)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)

    def loss(
        self,
        target: torch.Tensor,
        cond: torch.Tensor,
        weight: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Weighted mean hybrid diffusion loss of target (N, C) given cond (N, D); weight (N,).

        Each token is noised ``batch_mul`` times with independent t ~ U{0..T-1} (MAR's
        diffusion_batch_mul), which is cheap since the head is tiny next to the backbone. Draws
        come from ``generator`` on its own device (a CPU generator cannot fill CUDA tensors) and
        are moved to target's device; None means torch's default generator for target's device.
        """
        m = self.batch_mul
        weight_r = weight.float().repeat(m)  # (mN,)
        n = target.shape[0] * m
        gen_device = generator.device if generator is not None else target.device
        t = torch.randint(0, self.num_train_steps, (n,), generator=generator, device=gen_device)
        noise = torch.randn((n, target.shape[1]), generator=generator, device=gen_device, dtype=torch.float32)
        per_token = self.per_token_loss(target, cond, t.to(target.device), noise.to(target.device))
        # MAR: (loss * mask).sum() / mask.sum(); clamp keeps an all-zero weight batch finite.
        return (per_token * weight_r).sum() / weight_r.sum().clamp_min(1e-12)

    def per_token_loss(
        self, target: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Hybrid loss (mN,) of target (N, C) | cond (N, D) repeated batch_mul times, with the
        caller's timesteps t (mN,) and noise (mN, C) (FluidModel draws them from per-sample keys)."""
        m = self.batch_mul
        target_r, cond_r = target.float().repeat(m, 1), cond.repeat(m, 1)  # (mN, C), (mN, D)
        terms = self.train_diffusion.training_losses(lambda x, tt: self(x, tt, cond_r), target_r, t, noise)
        return terms["loss"]

    def gen_diffusion(self, num_steps: int) -> GaussianDiffusion | RectifiedFlow:
        if num_steps not in self._gen_diffusions:
            self._gen_diffusions[num_steps] = type(self.train_diffusion).respaced(
                self.num_train_steps, num_steps, self.train_diffusion.prediction
            )
        return self._gen_diffusions[num_steps]

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        noise_fn: NoiseFn,
        num_steps: int = 100,
        temperature: float = 1.0,
        cfg_scale: float | torch.Tensor | None = 1.0,
        method: str = "ddpm",
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """Draw one token per condition row; returns (N, token_dim). ``clip_x0``: see p_sample_loop.

        Unguided (``cfg_scale`` None or the float 1.0): cond is (N, D). Guided (any other float, or a
        per-row tensor (N,) such as MAR's linear guidance schedule): cond is (2N, D), first N rows
        conditional, last N unconditional; eps = uncond + s·(cond - uncond), variance from the
        conditional half, and both halves share x at every step, which gives exactly the
        conditional half of MAR's forward_with_cfg output. A (N,) tensor with cond of N rows is
        taken as an all-ones scale (unguided), decided by shape so that no device sync is needed.
        ``noise_fn`` follows ``GaussianDiffusion.p_sample_loop`` and must return (N, token_dim).
        """
        rows, c = cond.shape[0], self.token_dim
        if isinstance(cfg_scale, torch.Tensor):
            guided = rows == 2 * cfg_scale.shape[0]
            if not guided and rows != cfg_scale.shape[0]:
                raise ValueError(f"cfg_scale has {cfg_scale.shape[0]} rows, cond has {rows}")
        else:
            guided = cfg_scale is not None and float(cfg_scale) != 1.0
        if guided and rows % 2:
            raise ValueError("guided sampling needs cond with 2N rows (conditional then unconditional)")
        n = rows // 2 if guided else rows
        combine = None
        if guided:
            scale = cfg_scale if isinstance(cfg_scale, torch.Tensor) else torch.tensor(float(cfg_scale))
            scale = scale.to(cond.device, torch.float32).reshape(-1, 1)  # (N, 1) or (1, 1)

            def combine(out: torch.Tensor) -> torch.Tensor:
                cond_out, uncond_out = out[:n], out[n:]  # (N, out_dim) each
                # eps (or v, x0, the flow's velocity) guided; the variance (if any) is the conditional one
                eps = uncond_out[:, :c] + scale * (cond_out[:, :c] - uncond_out[:, :c])
                return torch.cat([eps, cond_out[:, c:]], dim=1)

        return self.gen_diffusion(num_steps).p_sample_loop(
            lambda x, t: self(x, t, cond),
            (n, c),
            noise_fn,
            temperature=temperature,
            cfg_combine=combine,
            method=method,
            clip_x0=clip_x0,
        )
