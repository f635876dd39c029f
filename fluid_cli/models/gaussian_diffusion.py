"""Per-token Gaussian diffusion math for the continuous-token head (Diffusion Loss).

Owns the noise schedule, the hybrid training loss and the ancestral / DDIM samplers, written from
the formulas of Improved DDPM (Nichol & Dhariwal 2021) in the configuration MAR's ``DiffLoss`` uses:
cosine schedule with 1000 training steps, epsilon prediction (or, as options, v- or x0-prediction),
learned-range variance
("LEARNED_RANGE"), MSE loss plus the variational bound with a frozen mean, no x0 clipping, and
sampling over an evenly respaced subset of the steps (100 for Fluid).

Schedule constants are float64 on the host; every use casts them to float32 on the data's device
(cached per device), so the module is device agnostic and does no host<->device syncs. Randomness
is never drawn here: the training noise and every sampling noise tensor come from the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fluid_cli.config import HeadPrediction, choices

PREDICTIONS = tuple(p for p in choices(HeadPrediction) if p != "flow")  # flow: flow_matching.py
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]

_LN2 = math.log(2.0)
# Names of the float64 schedule tables mirrored to each device as float32.
_TABLES = (
    "betas log_betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance posterior_log_variance_clipped "
    "posterior_mean_coef1 posterior_mean_coef2"
).split()


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Improved DDPM: betas discretising alpha_bar(s)=cos²((s+0.008)/1.008·π/2)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def space_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """Evenly spaced kept timesteps, as improved-diffusion's ``space_timesteps(T, str(num_steps))``.

    The stride is accumulated as a float and rounded per step (not ``i * stride``) so that the kept
    set matches the reference bit for bit; for 100 of 1000 it is 0, 10, 20, ..., 989, 999.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"cannot keep {num_steps} of {num_train_steps} diffusion steps")
    stride = 1.0 if num_steps == 1 else (num_train_steps - 1) / (num_steps - 1)
    kept, cur = [], 0.0
    for _ in range(num_steps):
        kept.append(round(cur))
        cur += stride
    return kept


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor):
    """Log-probability (nats) of the 1/255-wide bin around x under N(mean, e^(2·log_scale)).

    This is the decoder term of the DDPM bound for 8-bit data in [-1, 1]; MAR keeps it unchanged for
    continuous latents (t == 0 only, i.e. 1 in 1000 training draws), and we follow MAR. The normal
    CDF uses the same tanh approximation; the outermost bins absorb the tails.
    """

    def cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    inv_std = torch.exp(-log_scale)
    cdf_hi = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_lo = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_hi = torch.log(cdf_hi.clamp(min=1e-12))  # bin (-inf, x + 1/255] for the lowest value
    log_lo = torch.log((1.0 - cdf_lo).clamp(min=1e-12))  # bin [x - 1/255, inf) for the highest
    log_mid = torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))
    return torch.where(x < -0.999, log_hi, torch.where(x > 0.999, log_lo, log_mid))


class GaussianDiffusion:
    """A (possibly respaced) cosine diffusion with epsilon prediction and learned-range variance.

    Index ``t`` always runs over this object's own steps (0..num_steps-1); ``timestep_map[t]`` is the
    original training step the network is conditioned on (identity for the training schedule).
    """

    def __init__(
        self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None, prediction: str = "eps"
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        b = betas.detach().to("cpu", torch.float64)
        if b.ndim != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.num_steps = int(b.shape[0])
        n = self.num_steps
        self.timestep_map = (
            torch.arange(n, dtype=torch.long) if timestep_map is None else timestep_map.long().cpu()
        )
        self.betas = b
        self.log_betas = torch.log(b)
        self.alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
        self.alphas_cumprod_prev = torch.cat([b.new_ones(1), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        # Variance is 0 at t=0; like IDDPM, use the t=1 value there so the log stays finite. With a
        # single step there is no t=1; log(beta) is used (that step adds no noise anyway).
        if n > 1:
            pv = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
            self.posterior_log_variance_clipped = torch.log(pv)
        else:
            self.posterior_log_variance_clipped = self.log_betas.clone()
        self.posterior_mean_coef1 = b * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * (1.0 - b).sqrt() / (1.0 - ab)
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    @classmethod
    def cosine(cls, num_steps: int = 1000, prediction: str = "eps") -> GaussianDiffusion:
        return cls(cosine_betas(num_steps), prediction=prediction)

    @classmethod
    def respaced(
        cls, num_train_steps: int = 1000, num_steps: int = 100, prediction: str = "eps"
    ) -> GaussianDiffusion:
        """Keep ``num_steps`` evenly spaced steps; new betas keep alphas_cumprod at the kept t."""
        base_ab = torch.cumprod(1.0 - cosine_betas(num_train_steps), dim=0)
        kept = space_timesteps(num_train_steps, num_steps)
        ab = base_ab[kept]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return cls(
            1.0 - ab / ab_prev, timestep_map=torch.tensor(kept, dtype=torch.long), prediction=prediction
        )

    # ---- indexing helpers -------------------------------------------------------------------------

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        # float32 copies per device: indexing them with an on-device t needs no host sync.
        if device not in self._device_tables:
            tabs = {name: getattr(self, name).to(torch.float32).to(device) for name in _TABLES}
            tabs["timestep_map"] = self.timestep_map.to(device)
            self._device_tables[device] = tabs
        return self._device_tables[device]

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at per-row steps t (N,), shaped (N, 1, ...) to broadcast against x."""
        vals = self._tables(x.device)[name][t]  # (N,)
        return vals.view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map own step indices (N,) to the training steps the network was trained on."""
        return self._tables(t.device)["timestep_map"][t]

    # ---- forward process and model posterior -----------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t)·x_0 + sqrt(1-ab_t)·noise."""
        return (
            self._at("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (
            self._at("posterior_mean_coef1", t, x_t) * x_start
            + self._at("posterior_mean_coef2", t, x_t) * x_t
        )

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def v_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab)·eps - sqrt(1-ab)·x_0 (Salimans & Ho 2022)."""
        return (
            self._at("sqrt_alphas_cumprod", t, x_start) * noise
            - self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    def to_eps(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's (N, 2C) output with its first C channels as eps, whatever it predicts.
        v -> eps = sqrt(ab)·v + sqrt(1-ab)·x_t; x0 -> eps = (x_t/sqrt(ab) - x0) / sqrt(1/ab - 1). Both
        are affine in the output for a fixed x_t, so guidance mixes v or x0 exactly as it would eps."""
        if self.prediction == "eps":
            return model_out
        c = x_t.shape[1]
        if self.prediction == "v":
            eps = (
                self._at("sqrt_alphas_cumprod", t, x_t) * model_out[:, :c]
                + self._at("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
            )
        else:  # x0
            eps = (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - model_out[:, :c]) / self._at(
                "sqrt_recipm1_alphas_cumprod", t, x_t
            )
        return torch.cat([eps, model_out[:, c:]], dim=1)

    def p_mean_log_variance(
        self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split (N, 2C) output (eps-space: see to_eps) into eps / variance interpolant v; return
        (mean, log_var, pred_x0) of p(x_{t-1}|x_t).

        Learned range: v in [-1, 1] interpolates log-variance between the posterior variance
        (v=-1) and beta_t (v=1). No clipping of pred_x0: latents are not bounded to [-1, 1].
        """
        c = x_t.shape[1]
        eps, v = model_out[:, :c], model_out[:, c:]
        frac = (v + 1.0) / 2.0
        log_var = frac * self._at("log_betas", t, x_t) + (1.0 - frac) * self._at(
            "posterior_log_variance_clipped", t, x_t
        )
        pred_x0 = self.predict_xstart(x_t, t, eps)
        return self.q_posterior_mean(pred_x0, x_t, t), log_var, pred_x0

    # ---- training ---------------------------------------------------------------------------------

    def training_losses(
        self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss of IDDPM / DiT / MAR: mse + vb, both (N,), vb in bits per dim. The mse is on
        what the network predicts: eps (MAR), v (= eps error x 1/alpha_bar, which weights the
        high-noise steps, where only the condition tells x_0, far more: docs/shapes.md), or x0 (JiT:
        the x0 error itself, as large at high noise as anywhere).

        ``model_fn(x_t, t_model)`` gets the training step ``timestep_map[t]`` and returns (N, 2C).
        The vb term sees the mean prediction detached, so it trains only the variance output.
        """
        x_t = self.q_sample(x_start, t, noise)  # (N, C)
        out = model_fn(x_t, self.model_timesteps(t)).float()  # (N, 2C)
        c = x_start.shape[1]
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x_start
        else:
            target = self.v_target(x_start, t, noise)
        mse = ((target - out[:, :c]) ** 2).flatten(1).mean(dim=1)  # (N,)
        eps = self.to_eps(out, x_t, t)[:, :c]

        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        mean, log_var, _ = self.p_mean_log_variance(frozen, x_t, t)
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_var = self._at("posterior_log_variance_clipped", t, x_t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(dim=1) / _LN2
        # Decoder NLL at t == 0 (MAR's choice: the discretised Gaussian, see its docstring).
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var).flatten(1).mean(dim=1) / _LN2
        vb = torch.where(t == 0, nll, kl)  # static shapes: both branches computed, no indexing
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ---- sampling ---------------------------------------------------------------------------------

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
        """Denoise from x_T to x_0 over all of this object's steps; returns x_0 of ``shape``.

        Noise convention: ``noise_fn(-1)`` gives x_T; for DDPM, ``noise_fn(k)`` gives the noise added
        by the k-th denoising step (k = 0 is the noisiest step), for k = 0..num_steps-2: the final
        step (t = 0) adds none and is not asked. DDIM (eta = 0) asks only ``noise_fn(-1)`` and
        ignores ``temperature``. Each call must return a tensor of ``shape``.

        Guidance: with ``cfg_combine``, the network runs on [x; x] (2N rows, the caller's model_fn
        pairs them with conditional / unconditional cond) and ``cfg_combine`` maps its (2N, 2C)
        output to the guided (N, 2C). Both halves thus always see the same x, as in MAR.

        Note (MAR-faithful, not a bug): every respacing keeps t=999, where alpha_bar ~ 2.4e-9, so the
        first step moves x by ~300x (100 steps) the error of the eps prediction; an undertrained
        head therefore gives exploding samples. ``clip_x0`` (improved-diffusion's clip_denoised with
        the data's range instead of [-1, 1]) clamps the predicted x0 before the posterior mean,
        which bounds that error; None keeps MAR's unclipped sampler.
        """
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampling method {method!r}")
        x = noise_fn(-1)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise_fn(-1) returned {tuple(x.shape)}, expected {tuple(shape)}")
        n = shape[0]
        for k, i in enumerate(range(self.num_steps - 1, -1, -1)):
            t = torch.full((n,), i, dtype=torch.long, device=x.device)
            x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if cfg_combine is not None else (x, t)
            out = model_fn(x_in, self.model_timesteps(t_in)).float()
            if cfg_combine is not None:
                out = cfg_combine(out)  # (N, 2C)
            out = self.to_eps(out, x, t)
            mean, log_var, pred_x0 = self.p_mean_log_variance(out, x, t)
            if clip_x0:
                pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
                mean = self.q_posterior_mean(pred_x0, x, t)
                eps = (x - self._at("sqrt_alphas_cumprod", t, x) * pred_x0) / self._at(
                    "sqrt_one_minus_alphas_cumprod", t, x
                )
                out = torch.cat([eps, out[:, x.shape[1] :]], dim=1)  # DDIM steps with the clipped x0's eps
            if method == "ddim":
                x = self._ddim_step(out, x, t, pred_x0)
            elif i > 0:
                x = mean + torch.exp(0.5 * log_var) * noise_fn(k).to(x) * temperature
            else:
                x = mean
        return x

    def _ddim_step(
        self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, pred_x0: torch.Tensor
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0): x_{t-1} = sqrt(ab_prev)·x0 + sqrt(1-ab_prev)·eps."""
        eps = out[:, : x.shape[1]]
        ab_prev = self._at("alphas_cumprod_prev", t, x)
        return pred_x0 * ab_prev.sqrt() + (1.0 - ab_prev).sqrt() * eps
