"""Tests for the per-token diffusion math (gaussian_diffusion) and the DiffusionHead MLP (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from fluid_cli.models.diffusion_head import DiffusionHead
from fluid_cli.models.flow_matching import RectifiedFlow
from fluid_cli.models.gaussian_diffusion import GaussianDiffusion, cosine_betas, space_timesteps


def _noise_fn(seed: int, shape: tuple[int, ...]):
    """Keyed noise: step k always gets the same tensor for a given seed (no global RNG)."""

    def fn(k: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 10_000 + k + 1))

    return fn


def _randomize_zero_inits(head: DiffusionHead, seed: int = 0, std: float = 0.2) -> None:
    """Replace the zero-initialised adaLN / output layers so every parameter gets gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in [b.ada[-1] for b in head.blocks] + [head.final.ada[-1], head.final.linear]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * std)


# ---- schedule ---------------------------------------------------------------------------------------


def test_cosine_schedule_matches_formula() -> None:
    T = 1000

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    ref_betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    ref_ab, acc = [], 1.0
    for b in ref_betas:
        acc *= 1 - b
        ref_ab.append(acc)
    d = GaussianDiffusion.cosine(T)
    assert d.betas.dtype == torch.float64 and d.betas.shape == (T,)
    torch.testing.assert_close(d.betas, torch.tensor(ref_betas, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        d.alphas_cumprod, torch.tensor(ref_ab, dtype=torch.float64), rtol=1e-9, atol=1e-15
    )
    torch.testing.assert_close(cosine_betas(T), d.betas)
    assert 0 < d.betas[0] < 1e-4  # nearly noiseless first step
    assert bool((d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all())
    assert d.betas.max().item() == 0.999 and d.betas[-1].item() == 0.999  # clipped end
    assert d.alphas_cumprod_prev[0] == 1.0 and torch.equal(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    assert torch.equal(d.timestep_map, torch.arange(T))
    # Posterior log-variance is finite everywhere (t=0 borrows t=1).
    assert torch.isfinite(d.posterior_log_variance_clipped).all()
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_respaced_schedule() -> None:
    base = GaussianDiffusion.cosine(1000)
    d = GaussianDiffusion.respaced(1000, 100)
    assert d.num_steps == 100 and d.betas.shape == (100,)
    tm = d.timestep_map
    assert tm[0] == 0 and tm[-1] == 999
    assert tm.tolist() == [round(i * 999 / 99) for i in range(100)]
    assert set((tm[1:] - tm[:-1]).tolist()) <= {10, 11}
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[tm], rtol=1e-10, atol=1e-15)
    assert torch.isfinite(d.posterior_log_variance_clipped).all()
    one = GaussianDiffusion.respaced(1000, 1)
    assert one.timestep_map.tolist() == [0] and torch.isfinite(one.posterior_log_variance_clipped).all()


# ---- training loss ---------------------------------------------------------------------------------


def test_vb_zero_for_true_posterior() -> None:
    """A model that cheats with x_start and outputs the true posterior has mse ~ 0 and KL ~ 0."""
    d = GaussianDiffusion.cosine(1000)
    g = torch.Generator().manual_seed(0)
    n, c = 64, 16
    x0 = torch.randn(n, c, generator=g)
    noise = torch.randn(n, c, generator=g)
    t = torch.randint(1, 1000, (n,), generator=g)

    def cheat(x_t: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
        ab = d.alphas_cumprod[tm].float()[:, None]
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        v = -torch.ones_like(x_t)  # frac 0 -> posterior variance exactly
        return torch.cat([eps, v], dim=1)

    terms = d.training_losses(cheat, x0, t, noise)
    assert terms["loss"].shape == terms["mse"].shape == terms["vb"].shape == (n,)
    assert terms["mse"].max() < 1e-6
    assert terms["vb"].abs().max() < 1e-4
    # At t == 0 vb is the decoder NLL: finite and non-negative.
    t0 = d.training_losses(cheat, x0, torch.zeros(n, dtype=torch.long), noise)["vb"]
    assert torch.isfinite(t0).all() and (t0 >= 0).all()


def test_v_prediction_matches_eps_prediction() -> None:
    """A v-predicting network that outputs the true v is, after to_eps, the eps cheat: mse ~ 0 and
    KL ~ 0, and its sampler step equals the eps sampler's given the same eps."""
    g = torch.Generator().manual_seed(2)
    n, c = 64, 16
    x0, noise = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    t = torch.randint(1, 1000, (n,), generator=g)
    dv, de = GaussianDiffusion.cosine(1000, "v"), GaussianDiffusion.cosine(1000)
    fixed_var = -torch.ones(n, c)

    def true_v(x_t: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
        return torch.cat([dv.v_target(x0, tm, noise), fixed_var], dim=1)

    terms = dv.training_losses(true_v, x0, t, noise)
    assert terms["mse"].max() < 1e-6 and terms["vb"].abs().max() < 1e-4
    x_t = dv.q_sample(x0, t, noise)
    eps_out = dv.to_eps(true_v(x_t, t), x_t, t)
    torch.testing.assert_close(eps_out[:, :c], noise, atol=1e-4, rtol=1e-4)
    # a wrong v is penalised by its eps error / alpha_bar (the high-noise weighting)
    wrong = lambda x, tm: torch.cat([dv.v_target(x0, tm, noise) + 0.1, fixed_var], dim=1)  # noqa: E731
    ab = dv.alphas_cumprod[t].float()
    torch.testing.assert_close(dv.training_losses(wrong, x0, t, noise)["mse"], torch.full((n,), 0.01))
    eps_err = ((dv.to_eps(wrong(x_t, t), x_t, t)[:, :c] - noise) ** 2).mean(1)
    torch.testing.assert_close(eps_err, 0.01 * ab, atol=1e-6, rtol=1e-3)
    assert de.prediction == "eps" and GaussianDiffusion.respaced(1000, 10, "v").prediction == "v"
    with pytest.raises(ValueError, match="unknown prediction"):
        GaussianDiffusion.cosine(10, "x_0")


def test_x0_prediction_matches_eps_prediction() -> None:
    """An x0-predicting network that outputs the true x0 is, after to_eps, the eps cheat; its sampler
    sees exactly that x0; and a wrong x0 costs the same mse at every noise level (unlike eps)."""
    g = torch.Generator().manual_seed(3)
    n, c = 64, 16
    x0, noise = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    t = torch.randint(1, 1000, (n,), generator=g)
    d = GaussianDiffusion.cosine(1000, "x0")
    fixed_var = -torch.ones(n, c)
    true_x0 = lambda x, tm: torch.cat([x0, fixed_var], dim=1)  # noqa: E731
    terms = d.training_losses(true_x0, x0, t, noise)
    assert terms["mse"].max() < 1e-12 and terms["vb"].abs().max() < 1e-3
    x_t = d.q_sample(x0, t, noise)
    eps_out = d.to_eps(true_x0(x_t, t), x_t, t)
    torch.testing.assert_close(eps_out[:, :c], noise, atol=2e-3, rtol=1e-3)
    _, _, pred_x0 = d.p_mean_log_variance(eps_out, x_t, t)
    # the round trip x0 -> eps -> x0 multiplies float32 rounding by 1/sqrt(alpha_bar), ~2e4 at t=999
    torch.testing.assert_close(pred_x0, x0, atol=1e-2, rtol=1e-3)
    wrong = lambda x, tm: torch.cat([x0 + 0.1, fixed_var], dim=1)  # noqa: E731
    torch.testing.assert_close(d.training_losses(wrong, x0, t, noise)["mse"], torch.full((n,), 0.01))


def test_vb_gradient_only_into_variance() -> None:
    d = GaussianDiffusion.cosine(1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    out = torch.randn(8, 8, generator=g, requires_grad=True)
    terms = d.training_losses(lambda x, t: out, x0, torch.arange(1, 9) * 100, noise)
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0


# ---- head: structure, loss, training ---------------------------------------------------------------


@pytest.mark.parametrize("dims", [(16, 48, 64, 6), (4, 8, 32, 2), (3, 5, 7, 0)])
def test_param_count_closed_form(dims: tuple[int, int, int, int]) -> None:
    head = DiffusionHead(*dims)
    assert DiffusionHead.param_count(*dims) == sum(p.numel() for p in head.parameters())
    flow = DiffusionHead(*dims, prediction="flow")  # the velocity only: no variance outputs
    assert flow.final.linear.out_features == dims[0]
    assert DiffusionHead.param_count(*dims, out_dim=dims[0]) == sum(p.numel() for p in flow.parameters())


def test_forward_shape_and_zero_init() -> None:
    head = DiffusionHead(token_dim=4, cond_dim=8, width=32, depth=2)
    out = head(torch.randn(5, 4), torch.randint(0, 1000, (5,)), torch.randn(5, 8))
    assert out.shape == (5, 8) and out.abs().max() == 0  # zero-init output layer


def test_loss_finite_and_grads_reach_all_params() -> None:
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=32, depth=2)
    _randomize_zero_inits(head)
    g = torch.Generator().manual_seed(0)
    target, cond = torch.randn(10, 4, generator=g), torch.randn(10, 8, generator=g)
    weight = torch.tensor([1.0] * 7 + [0.0] * 3)
    loss = head.loss(target, cond, weight, generator=g)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Same generator state -> same loss; zero-weight rows do not matter.
    l1 = head.loss(target, cond, weight, generator=torch.Generator().manual_seed(5))
    target2 = target.clone()
    target2[7:] = 100.0
    l2 = head.loss(target2, cond, weight, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(l1, l2)


def test_per_token_loss_matches_loss() -> None:
    """per_token_loss with the draws ``loss`` would make gives the same weighted mean."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=32, depth=2, batch_mul=3)
    _randomize_zero_inits(head)
    g = torch.Generator().manual_seed(0)
    target, cond = torch.randn(5, 4, generator=g), torch.randn(5, 8, generator=g)
    weight = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5])
    expected = head.loss(target, cond, weight, generator=torch.Generator().manual_seed(9))
    g2 = torch.Generator().manual_seed(9)
    t = torch.randint(0, 1000, (15,), generator=g2)
    noise = torch.randn(15, 4, generator=g2)
    per = head.per_token_loss(target, cond, t, noise)  # (15,) = 3 copies of the 5 rows
    assert per.shape == (15,)
    w = weight.repeat(3)
    torch.testing.assert_close((per * w).sum() / w.sum(), expected)


def _train(head: DiffusionHead, sample_batch, steps: int, lr: float = 3e-3, seed: int = 0) -> None:
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        target, cond = sample_batch(g)
        loss = head.loss(target, cond, torch.ones(target.shape[0]), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _eval_loss(head: DiffusionHead, sample_batch) -> float:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        losses = [head.loss(*sample_batch(g), torch.ones(256), generator=g).item() for _ in range(4)]
    return sum(losses) / len(losses)


_SIGNS = torch.tensor([1.0, -1.0])


def _signed_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-point conditional data: cond = +1s selects x ~ N(+2, 0.1²), cond = -1s selects N(-2, 0.1²)."""
    sgn = _SIGNS[torch.randint(0, 2, (256,), generator=g)][:, None]  # (256, 1)
    return 2.0 * sgn + 0.1 * torch.randn(256, 4, generator=g), sgn.expand(256, 8)


@pytest.fixture(scope="module")
def overfit_head() -> tuple[DiffusionHead, float, float]:
    """A tiny head trained 150 Adam steps on ``_signed_batch``; with its loss before and after."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=32, depth=2, batch_mul=4)
    before = _eval_loss(head, _signed_batch)
    _train(head, _signed_batch, steps=150)
    return head, before, _eval_loss(head, _signed_batch)


def test_loss_falls_when_overfitting(overfit_head: tuple[DiffusionHead, float, float]) -> None:
    _, before, after = overfit_head
    assert math.isfinite(after) and after < 0.25 * before, (before, after)


# ---- head: sampling --------------------------------------------------------------------------------


def test_sample_deterministic_shapes_and_ddim() -> None:
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=32, depth=2)
    _randomize_zero_inits(head, std=0.05)
    cond = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    a = head.sample(cond, _noise_fn(7, (6, 4)), num_steps=20, temperature=0.9)
    b = head.sample(cond, _noise_fn(7, (6, 4)), num_steps=20, temperature=0.9)
    c = head.sample(cond, _noise_fn(8, (6, 4)), num_steps=20, temperature=0.9)
    assert a.shape == (6, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    d1 = head.sample(cond, _noise_fn(7, (6, 4)), num_steps=20, method="ddim")
    d2 = head.sample(cond, _noise_fn(7, (6, 4)), num_steps=20, method="ddim", temperature=0.5)
    assert d1.shape == (6, 4) and torch.isfinite(d1).all() and torch.equal(d1, d2)
    assert head.gen_diffusion(20) is head.gen_diffusion(20)  # cached per step count


def test_sample_loop_recovers_x0_with_oracle() -> None:
    """With an oracle eps (knows x0) both samplers end exactly at x0 whatever the noise."""
    base = GaussianDiffusion.cosine(1000)
    d = GaussianDiffusion.respaced(1000, 10)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))

    def oracle(x_t: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
        ab = base.alphas_cumprod[tm].float()[:, None]
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    calls: list[int] = []

    def noise(k: int) -> torch.Tensor:
        calls.append(k)
        return _noise_fn(4, (5, 3))(k)

    for method in ("ddpm", "ddim"):
        out = d.p_sample_loop(oracle, (5, 3), noise, method=method)
        torch.testing.assert_close(out, x0, rtol=1e-3, atol=1e-3)
    # DDPM asks x_T (-1) then steps 0..S-2; DDIM only x_T.
    assert calls == [-1, *range(9), -1]


def test_cfg_scale_one_equals_unguided() -> None:
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=32, depth=2)
    _randomize_zero_inits(head, std=0.05)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    plain = head.sample(cond, _noise_fn(1, (5, 4)), num_steps=10)
    ones = head.sample(torch.cat([cond, uncond]), _noise_fn(1, (5, 4)), num_steps=10, cfg_scale=torch.ones(5))
    torch.testing.assert_close(plain, ones, rtol=1e-4, atol=1e-4)
    # A per-row tensor with N rows of cond is the unguided path.
    same = head.sample(cond, _noise_fn(1, (5, 4)), num_steps=10, cfg_scale=torch.ones(5))
    assert torch.equal(plain, same)
    with pytest.raises(ValueError):
        head.sample(torch.cat([cond, uncond[:4]]), _noise_fn(1, (4, 4)), num_steps=10, cfg_scale=2.0)


def test_cfg_combination_by_hand() -> None:
    """Two respaced steps (t=999 then t=0), per-row scale: guided eps, cond-half variance, shared x."""
    torch.manual_seed(0)
    n, c = 3, 4
    head = DiffusionHead(token_dim=c, cond_dim=8, width=32, depth=2)
    _randomize_zero_inits(head, std=0.1)
    g = torch.Generator().manual_seed(4)
    cond2 = torch.randn(2 * n, 8, generator=g)
    s = torch.tensor([0.0, 1.5, 4.0])
    temp = 0.8
    noise = _noise_fn(9, (n, c))
    got = head.sample(cond2, noise, num_steps=2, temperature=temp, cfg_scale=s)

    d = head.gen_diffusion(2)
    assert d.timestep_map.tolist() == [0, 999]
    x = noise(-1)
    for k, i in enumerate([1, 0]):
        out = head(torch.cat([x, x]), torch.full((2 * n,), int(d.timestep_map[i])), cond2)
        eps = out[n:, :c] + s[:, None] * (out[:n, :c] - out[n:, :c])
        frac = (out[:n, c:] + 1) / 2
        log_var = frac * math.log(d.betas[i]) + (1 - frac) * float(d.posterior_log_variance_clipped[i])
        ab = float(d.alphas_cumprod[i])
        x0 = x / math.sqrt(ab) - math.sqrt(1 / ab - 1) * eps
        mean = float(d.posterior_mean_coef1[i]) * x0 + float(d.posterior_mean_coef2[i]) * x
        x = mean + torch.exp(0.5 * log_var) * noise(k) * temp if i > 0 else mean
    scale = x.abs().max().item()
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_first_respaced_step_amplifies_eps_error() -> None:
    """MAR's schedule keeps t=999 (alpha_bar ~ 2.4e-9): there, x_{t-1} moves ~300x any eps error.

    Pinned because it explains the next test: a head trained for seconds cannot predict eps at t=999
    to the ~1e-3 this needs, so its full 100-step samples blow up; long-trained heads do (MAR).
    """
    d = GaussianDiffusion.respaced(1000, 100)
    gain = float(d.posterior_mean_coef1[-1] * d.sqrt_recipm1_alphas_cumprod[-1])  # |d mean / d eps|
    assert 200 < gain < 400
    assert float(d.alphas_cumprod[-1]) < 1e-8


def test_conditional_sampling_hits_selected_mean(overfit_head: tuple[DiffusionHead, float, float]) -> None:
    """cond selects the target (+2 or -2 in every channel); samples land near the right mean.

    Sampled through the respaced steps up to t=979 only (same kept steps and construction as
    ``respaced(1000, 100)``, minus t=989 and t=999), for the reason pinned in the test above.
    """
    head = overfit_head[0]
    base = GaussianDiffusion.cosine(1000)
    kept = torch.tensor([t for t in space_timesteps(1000, 100) if t < 980])
    ab = base.alphas_cumprod[kept]
    d = GaussianDiffusion(1.0 - ab / torch.cat([ab.new_ones(1), ab[:-1]]), timestep_map=kept)
    cond = torch.cat([torch.ones(32, 8), -torch.ones(32, 8)])  # (64, 8)
    out = d.p_sample_loop(lambda x, t: head(x, t, cond), (64, 4), _noise_fn(5, (64, 4)))
    assert out.shape == (64, 4) and torch.isfinite(out).all()
    assert (out[:32].mean() - 2.0).abs() < 0.5 and (out[32:].mean() + 2.0).abs() < 0.5
    assert out[:32].std() < 0.5 and out[32:].std() < 0.5
    # The public path runs the same net end to end (values not checked, see above).
    assert head.sample(cond, _noise_fn(5, (64, 4)), num_steps=100).shape == (64, 4)


# ---- rectified flow (model.head_prediction = "flow") -----------------------------------------------


def test_flow_levels_are_logit_normal_quantiles() -> None:
    """The keyed integer steps map to increasing noise levels in (0, 1) with the median at 0.5."""
    flow = RectifiedFlow(1000)
    s = flow.train_levels(torch.arange(1000))
    assert bool((s > 0).all() and (s < 1).all() and (s.diff() > 0).all())
    assert abs(float(s[499:501].mean()) - 0.5) < 1e-3
    normal = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(torch.logit(s[[99, 899]]), normal.icdf(torch.tensor([0.0995, 0.8995])))


def test_flow_loss_is_velocity_mse() -> None:
    """The true velocity costs nothing; an error d in v costs d^2 (an x0 error of s·d, so a given x0
    error weighs 1/s^2: as much at high noise as an x0 loss, unlike eps)."""
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(32, 4, generator=g), torch.randn(32, 4, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    flow = RectifiedFlow(1000)
    s = flow.train_levels(t)[:, None]
    seen = {}

    def oracle(err: float):
        def fn(x_t: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
            seen["x_t"], seen["tm"] = x_t, tm
            return noise - x0 + err

        return fn

    assert flow.training_losses(oracle(0.0), x0, t, noise)["loss"].abs().max() < 1e-10
    torch.testing.assert_close(seen["x_t"], (1 - s) * x0 + s * noise)
    torch.testing.assert_close(seen["tm"], 1000 * s[:, 0])
    torch.testing.assert_close(
        flow.training_losses(oracle(0.1), x0, t, noise)["loss"], torch.full((32,), 0.01)
    )


def test_flow_sampler_follows_the_velocity_field() -> None:
    """For a point mass at c the true velocity is (x - c)/s and Euler steps end exactly at c from any
    noise; guidance combines the conditional and unconditional velocities; clip_x0 bounds x0."""
    c = torch.tensor([[0.5, -1.0, 2.0]]).expand(4, 3)
    flow = RectifiedFlow.respaced(1000, 10)
    assert flow.num_steps == 10 and flow.prediction == "flow"

    def field(x: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
        return (x - c) / (tm[:, None] / 1000)

    for temperature in (1.0, 0.5):
        out = flow.p_sample_loop(field, (4, 3), _noise_fn(3, (4, 3)), temperature=temperature)
        torch.testing.assert_close(out, c, atol=1e-5, rtol=1e-5)
    clipped = flow.p_sample_loop(field, (4, 3), _noise_fn(3, (4, 3)), clip_x0=1.5)
    torch.testing.assert_close(clipped, c.clamp(-1.5, 1.5), atol=1e-5, rtol=1e-5)

    # guidance: conditional rows aim at c, unconditional at 0; scale 2 aims at 2c (linear field)
    def two_way(x: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
        return (x - torch.cat([c, torch.zeros_like(c)])) / (tm[:, None] / 1000)

    combine = lambda out: 2 * out[:4] - out[4:]  # noqa: E731
    guided = flow.p_sample_loop(two_way, (4, 3), _noise_fn(3, (4, 3)), cfg_combine=combine)
    torch.testing.assert_close(guided, 2 * c, atol=1e-4, rtol=1e-4)


def test_flow_head_learns_the_conditional_targets() -> None:
    """A tiny flow head trained on the two-point data samples near the mean its condition selects,
    through the public sampler (all steps, from s = 1)."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=32, depth=2, batch_mul=4, prediction="flow")
    before = _eval_loss(head, _signed_batch)
    _train(head, _signed_batch, steps=150)
    assert _eval_loss(head, _signed_batch) < 0.25 * before
    cond = torch.cat([torch.ones(32, 8), -torch.ones(32, 8)])
    out = head.sample(cond, _noise_fn(5, (64, 4)), num_steps=50)
    assert (out[:32].mean() - 2.0).abs() < 0.3 and (out[32:].mean() + 2.0).abs() < 0.3
    assert out[:32].std() < 0.5 and out[32:].std() < 0.5
