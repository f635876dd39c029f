"""Rectified-flow math for the continuous-token head: an option beside MAR's Gaussian diffusion.

x_t = (1 - s)·x_0 + s·noise for s in [0, 1]; the network predicts the velocity v = noise - x_0
(minRF / SD3), trained with a plain MSE on v at logit-normal s (SD3's sigmoid(N(0, 1))), and sampled
by Euler steps of the ODE from s = 1 to 0. In x_0 terms the v-loss weighs an error by 1/s^2: at
high noise (s -> 1) about as much as an x_0 loss, where the eps loss of Gaussian diffusion weighs
it by the vanishing signal-to-noise ratio. That is where a token's coarse content (on the shapes
world: object or background, and its colour) is decided, so the head must learn to read it from
its condition (docs/shapes.md).

The object offers what `DiffusionHead` asks of `GaussianDiffusion`: `training_losses` with the
caller's integer steps t in [0, T) (FluidModel draws them keyed; they are mapped through the
logit-normal's quantile function, so the keyed draw stays the only randomness), `model_timesteps`,
`p_sample_loop` with the same noise / guidance conventions, and `respaced`. The network sees s·T
as its timestep, so the sinusoidal embedding gets the same range as for diffusion; it outputs the
velocity only (models/config.py's `head_output_dim`: there is no variance to learn).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fluid_cli.models.gaussian_diffusion import ModelFn, NoiseFn

LOGIT_MEAN, LOGIT_STD = 0.0, 1.0  # SD3's logit-normal timestep density


class RectifiedFlow:
    prediction = "flow"

    def __init__(self, num_train_steps: int = 1000, num_steps: int | None = None) -> None:
        self.num_train_steps = num_train_steps
        self.num_steps = num_steps or num_train_steps

    @classmethod
    def respaced(
        cls, num_train_steps: int = 1000, num_steps: int = 100, prediction: str = "flow"
    ) -> RectifiedFlow:
        return cls(num_train_steps, num_steps)

    def train_levels(self, t: torch.Tensor) -> torch.Tensor:
        """Integer steps t (N,) in [0, T) -> noise levels s (N,) of the logit-normal density: t is
        read as the uniform quantile (t + 0.5) / T and mapped through the density's inverse CDF."""
        u = (t.float() + 0.5) / self.num_train_steps
        return torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.special.ndtri(u))

    def model_timesteps(self, s: torch.Tensor) -> torch.Tensor:
        return s * self.num_train_steps

    def training_losses(
        self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """MSE between the predicted and the true velocity, (N,)."""
        s = self.train_levels(t)[:, None]  # (N, 1)
        x_t = (1.0 - s) * x_start + s * noise
        v = model_fn(x_t, self.model_timesteps(s[:, 0])).float()  # (N, C)
        mse = ((noise - x_start - v) ** 2).flatten(1).mean(dim=1)
        return {"loss": mse, "mse": mse}

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        noise_fn: NoiseFn,
        temperature: float = 1.0,
        cfg_combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
        method: str = "ddpm",
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """Euler steps of the ODE over num_steps equal steps of s, from x_1 = temperature·noise_fn(-1).
        Deterministic after the first draw (`method` is not used: there is no variance to learn).
        ``clip_x0`` clamps the implied x_0 = x_s - s·v before each step, as the diffusion sampler."""
        x = noise_fn(-1) * temperature
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise_fn(-1) returned {tuple(x.shape)}, expected {tuple(shape)}")
        n, guided = shape[0], cfg_combine is not None
        levels = torch.linspace(1.0, 0.0, self.num_steps + 1, device=x.device)
        for k in range(self.num_steps):
            s, s_next = levels[k], levels[k + 1]
            s_rows = s.expand(n)
            x_in, s_in = (torch.cat([x, x]), torch.cat([s_rows, s_rows])) if guided else (x, s_rows)
            v = model_fn(x_in, self.model_timesteps(s_in)).float()  # ((2)N, C)
            if guided:
                v = cfg_combine(v)  # (N, C)
            if clip_x0:
                x0 = (x - s * v).clamp(-clip_x0, clip_x0)
                v = (x - x0) / s
            x = x + (s_next - s) * v
        return x
