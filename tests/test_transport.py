"""Tests for diffmoe_dist.transport: path convention, loss, samplers on an analytic flow, CFG.

The analytic flow: data x1 ~ N(mu, s^2 I), noise x0 ~ N(0, I), z_t = t x1 + (1 - t) x0. Then
z_t ~ N(t mu, V(t) I) with V(t) = t^2 s^2 + (1 - t)^2, the optimal velocity is
    v*(z, t) = E[x1 - x0 | z_t = z] = mu + (t s^2 - (1 - t)) / V(t) * (z - t mu),
its ODE flow map is z_t = t mu + sqrt(V(t)) x0, so the exact endpoint of x0 is mu + s x0, and the
score of p_t is -(z - t mu) / V(t).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffmoe_dist.transport import (
    FLOW_SAMPLERS,
    RectifiedFlow,
    cfg_velocity_fn,
    flow_matching_loss,
    flow_matching_mse,
    sample,
    sample_dopri5,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
)

F64 = torch.float64
MU = torch.tensor([1.5, -0.5], dtype=F64)  # data mean, D = 2
S = 0.5  # data std


def _t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def gaussian_velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact optimal velocity v*(z, t) for N(MU, S^2 I) data; z [B, D], t [B]."""
    tb = _t(t, z)
    var = tb**2 * S**2 + (1 - tb) ** 2
    return MU + (tb * S**2 - (1 - tb)) / var * (z - tb * MU)


def gaussian_score(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tb = _t(t, z)
    var = tb**2 * S**2 + (1 - tb) ** 2
    return -(z - tb * MU) / var


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, MU.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------- path


def test_path_endpoints_target_and_schedule() -> None:
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    z0 = RectifiedFlow.interpolate(x1, x0, torch.zeros(3))
    z1 = RectifiedFlow.interpolate(x1, x0, torch.ones(3))
    torch.testing.assert_close(z0, x0, rtol=0, atol=0)  # t = 0 is noise
    torch.testing.assert_close(z1, x1, rtol=0, atol=0)  # t = 1 is data
    torch.testing.assert_close(RectifiedFlow.target(x1, x0), x1 - x0)
    # Per-sample t broadcasts over C, H, W: sample b uses t[b] only.
    t = torch.tensor([0.0, 0.25, 0.9])
    z = RectifiedFlow.interpolate(x1, x0, t)
    for b in range(3):
        torch.testing.assert_close(z[b], t[b] * x1[b] + (1 - t[b]) * x0[b])
    # d z_t / dt = alpha' x1 + sigma' x0 = target (finite difference is exact for a linear path).
    h = 1e-3
    fd = (RectifiedFlow.interpolate(x1, x0, t + h) - RectifiedFlow.interpolate(x1, x0, t)) / h
    torch.testing.assert_close(fd, RectifiedFlow.target(x1, x0), rtol=1e-3, atol=1e-3)
    tt = torch.tensor([0.3])
    assert float(RectifiedFlow.alpha(tt)) == pytest.approx(0.3)
    assert float(RectifiedFlow.sigma(tt)) == pytest.approx(0.7)
    assert float(RectifiedFlow.d_alpha(tt)) == 1.0 and float(RectifiedFlow.d_sigma(tt)) == -1.0


def test_path_conversions_invert() -> None:
    g = torch.Generator().manual_seed(2)
    x1, x0 = (
        torch.randn(4, 2, 3, generator=g, dtype=F64),
        torch.randn(4, 2, 3, generator=g, dtype=F64),
    )
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=F64)
    z = RectifiedFlow.interpolate(x1, x0, t)
    v = RectifiedFlow.target(x1, x0)
    torch.testing.assert_close(RectifiedFlow.velocity_to_eps(z, t, v), x0)
    torch.testing.assert_close(RectifiedFlow.velocity_to_data(z, t, v), x1)
    torch.testing.assert_close(RectifiedFlow.eps_to_velocity(z, t, x0), v)
    score = RectifiedFlow.velocity_to_score(z, t, v)
    torch.testing.assert_close(RectifiedFlow.score_to_velocity(z, t, score), v)
    # The score of the exact Gaussian velocity field is the analytic Gaussian score.
    zg = noise(6, seed=3) * 1.3 + 0.2
    tg = torch.linspace(0.05, 0.9, 6, dtype=F64)
    torch.testing.assert_close(
        RectifiedFlow.velocity_to_score(zg, tg, gaussian_velocity(zg, tg)), gaussian_score(zg, tg)
    )


def test_path_bad_input() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        RectifiedFlow.interpolate(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="x1 and x0"):
        RectifiedFlow.interpolate(x, torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="t < 1"):
        RectifiedFlow.velocity_to_score(x, torch.tensor([0.5, 1.0]), x)


# ---------------------------------------------------------------------------------- loss


def test_loss_matches_hand_computation() -> None:
    x1 = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # [2, 1, 1, 2]
    x0 = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 1.0]]]])
    t = torch.tensor([0.5, 0.25])
    y = torch.tensor([3, 7])
    seen = {}

    def model(z: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        seen.update(z=z.clone(), t=tt.clone(), y=yy.clone())
        return torch.ones_like(z)  # predicts velocity 1 everywhere

    loss = flow_matching_loss(model, x1, x0, t, y)
    # Targets x1 - x0: sample 0 [1, 1] -> errors [0, 0] -> 0; sample 1 [-2, -2] -> errors [3, 3] -> 9.
    torch.testing.assert_close(loss, torch.tensor([0.0, 9.0]))
    # The model saw z_t (sample 1: 0.25 * [0, -1] + 0.75 * [2, 1] = [1.5, 0.5]), raw t and y.
    torch.testing.assert_close(seen["z"][1, 0, 0], torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(seen["t"], t)
    assert torch.equal(seen["y"], y)


def test_loss_zero_for_exact_target_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(4)
    x1, x0 = torch.randn(5, 4, 4, 4, generator=g), torch.randn(5, 4, 4, 4, generator=g)
    t, y = torch.rand(5, generator=g), torch.zeros(5, dtype=torch.long)

    def oracle(z: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        # Recover the pair from z and the known noise: x1 = (z - (1 - t) x0) / t.
        tb = _t(tt, z)
        return (z - (1 - tb) * x0) / tb - x0

    loss = flow_matching_loss(oracle, x1, x0, t, y)
    assert loss.shape == (5,)
    torch.testing.assert_close(loss, torch.zeros(5), atol=1e-9, rtol=0)
    loss_bad = flow_matching_loss(lambda z, tt, yy: torch.zeros_like(z), x1, x0, t, y)
    torch.testing.assert_close(loss_bad, (x1 - x0).pow(2).mean(dim=(1, 2, 3)))
    # bf16 predictions still give an fp32 per-sample loss.
    assert flow_matching_mse((x1 - x0).bfloat16(), x1, x0).dtype == torch.float32


def test_loss_bad_shapes() -> None:
    x = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        flow_matching_loss(lambda z, t, y: z, x, x, torch.zeros(2, 1), torch.zeros(2).long())
    with pytest.raises(ValueError, match="v_pred must have the shape"):
        flow_matching_loss(lambda z, t, y: z[:, :3], x, x, torch.zeros(2), torch.zeros(2).long())


# ---------------------------------------------------------------------------------- samplers


def _endpoint_error(name: str, **kw: object) -> tuple[float, int]:
    x0 = noise(64)
    out = sample(name, gaussian_velocity, x0, **kw)
    exact = MU + S * x0  # analytic transport map of each noise sample
    return float((out.x - exact).abs().max()), out.nfe


def test_euler_and_heun_converge_to_analytic_map_at_their_orders() -> None:
    e16, nfe_e = _endpoint_error("euler", num_steps=16)
    e32, _ = _endpoint_error("euler", num_steps=32)
    h16, nfe_h = _endpoint_error("heun", num_steps=16)
    h32, _ = _endpoint_error("heun", num_steps=32)
    assert nfe_e == 16 and nfe_h == 32
    assert e32 < 0.1, e32  # measured 0.071 (max over 64 samples)
    assert h32 < 2e-3, h32  # measured 6.6e-4
    assert h16 < e16 / 10  # Heun beats Euler at equal steps
    # Doubling the steps halves Euler's error (1st order) and quarters Heun's (2nd order).
    assert 0.4 < e32 / e16 < 0.6, e32 / e16
    assert 0.2 < h32 / h16 < 0.3, h32 / h16


def test_dopri5_is_tight() -> None:
    err, nfe = _endpoint_error("dopri5", atol=1e-9, rtol=1e-9)
    assert err < 1e-6, err
    assert nfe > 6  # adaptive: several accepted steps of 6 evaluations each
    loose, nfe_loose = _endpoint_error("dopri5", atol=1e-4, rtol=1e-4)
    assert nfe_loose < nfe and loose < 1e-2


def test_samplers_pass_per_sample_time_and_keep_dtype() -> None:
    seen: list[torch.Tensor] = []

    def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.zeros_like(z)

    z0 = torch.zeros(3, 4, 2, 2, dtype=torch.bfloat16)
    out = sample_heun(fn, z0, num_steps=2)
    assert out.x.dtype == torch.bfloat16 and out.nfe == 4
    assert all(t.shape == (3,) and t.dtype == torch.float32 for t in seen)
    assert [float(t[0]) for t in seen] == [0.0, 0.5, 0.5, 1.0]


@pytest.mark.parametrize("diffusion", ["sigma", "constant", "decreasing", "increasing-decreasing"])
def test_sde_matches_data_distribution(diffusion: str) -> None:
    n, steps = 4000, 100
    x0 = noise(n, seed=5)
    gen = torch.Generator().manual_seed(6)
    out = sample_euler_maruyama(gaussian_velocity, x0, steps, diffusion=diffusion, generator=gen)
    assert out.nfe == steps and torch.isfinite(out.x).all()
    # Statistical tolerance: std error of the mean is S / sqrt(n) = 0.0079, of the std about
    # S / sqrt(2 n) = 0.0056; allow 5 of those plus 0.01 for the O(1/steps) discretisation bias
    # (measured with n = 200000: at most 0.004 on mean and std for every diffusion form).
    mean, std = out.x.mean(dim=0), out.x.std(dim=0)
    assert (mean - MU).abs().max() < 5 * S / math.sqrt(n) + 0.01, mean
    assert (std - S).abs().max() < 5 * S / math.sqrt(2 * n) + 0.01, std
    # It is a stochastic sampler: endpoints are not the deterministic transport map, and a
    # different Brownian path gives different samples.
    ode_map = MU + S * x0
    assert float((out.x - ode_map).abs().mean()) > 0.05
    other = sample_euler_maruyama(
        gaussian_velocity,
        x0,
        steps,
        diffusion=diffusion,
        generator=torch.Generator().manual_seed(7),
    )
    assert not torch.allclose(other.x, out.x)


def test_sde_without_noise_is_euler_and_single_step_is_deterministic() -> None:
    x0 = noise(8)
    sde = sample_euler_maruyama(gaussian_velocity, x0, 10, diffusion_norm=0.0)
    torch.testing.assert_close(sde.x, sample_euler(gaussian_velocity, x0, 10).x)
    one = sample_euler_maruyama(gaussian_velocity, x0, 1)
    torch.testing.assert_close(one.x, sample_euler(gaussian_velocity, x0, 1).x)


def test_sampler_bad_input() -> None:
    z0 = noise(2)
    with pytest.raises(ValueError, match=r"'euler', 'heun', 'dopri5', 'sde'.*'rk4'"):
        sample("rk4", gaussian_velocity, z0, num_steps=4)
    assert FLOW_SAMPLERS == ("euler", "heun", "dopri5", "sde")
    for fn in (sample_euler, sample_heun, sample_euler_maruyama):
        with pytest.raises(ValueError, match="num_steps must be an int >= 1, got 0"):
            fn(gaussian_velocity, z0, 0)
    with pytest.raises(ValueError, match="num_steps"):
        sample("euler", gaussian_velocity, z0, num_steps=2.5)
    with pytest.raises(ValueError, match="atol must be"):
        sample_dopri5(gaussian_velocity, z0, atol=0.0)
    with pytest.raises(ValueError, match="diffusion must be one of"):
        sample_euler_maruyama(gaussian_velocity, z0, 4, diffusion="SBDM-typo")
    with pytest.raises(ValueError, match="velocity_fn must return"):
        sample_euler(lambda z, t: z[:1], z0, 2)


# ---------------------------------------------------------------------------------- CFG


class RecordingLinearModel:
    """v = A[y] * z + b[y] + t, channel-wise; 4 channels with different coefficients per class."""

    def __init__(self, num_classes: int) -> None:
        g = torch.Generator().manual_seed(8)
        self.a = torch.randn(num_classes + 1, 4, generator=g, dtype=F64)
        self.b = torch.randn(num_classes + 1, 4, generator=g, dtype=F64)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((z.clone(), t.clone(), y.clone()))
        return self.a[y][:, :, None, None] * z + self.b[y][:, :, None, None] + _t(t, z)


def _cfg_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    z = torch.randn(3, 4, 2, 2, generator=g, dtype=F64)
    return z, torch.tensor([0.2, 0.5, 0.9], dtype=F64), torch.tensor([0, 2, 1])


def test_cfg_scale_one_is_a_single_conditional_forward() -> None:
    model = RecordingLinearModel(num_classes=3)
    z, t, y = _cfg_inputs()
    fn = cfg_velocity_fn(model, y, cfg_scale=1.0, null_class=3)
    v = fn(z, t)
    assert len(model.calls) == 1 and torch.equal(model.calls[0][2], y)
    torch.testing.assert_close(
        v, model.a[y][:, :, None, None] * z + model.b[y][:, :, None, None] + _t(t, z)
    )
    assert (fn.num_calls, fn.num_model_forwards, fn.num_model_samples) == (1, 1, 3)


@pytest.mark.parametrize("pool_mode", ["joint", "separate"])
def test_cfg_guides_every_channel(pool_mode: str) -> None:
    model = RecordingLinearModel(num_classes=3)
    z, t, y = _cfg_inputs()
    s = 4.0
    v = cfg_velocity_fn(model, y, cfg_scale=s, null_class=3, pool_mode=pool_mode)(z, t)
    null = torch.full_like(y, 3)
    v_c = model.a[y][:, :, None, None] * z + model.b[y][:, :, None, None] + _t(t, z)
    v_u = model.a[null][:, :, None, None] * z + model.b[null][:, :, None, None] + _t(t, z)
    expected = v_u + s * (v_c - v_u)
    for c in range(4):  # channel 3 too (DiT's forward_with_cfg leaves it unguided)
        torch.testing.assert_close(v[:, c], expected[:, c])
        assert not torch.allclose(v[:, c], v_c[:, c])  # guidance changed this channel


def test_cfg_pool_modes_batch_composition() -> None:
    z, t, y = _cfg_inputs()
    null = torch.full_like(y, 3)
    joint_model = RecordingLinearModel(num_classes=3)
    joint = cfg_velocity_fn(joint_model, y, cfg_scale=2.0, null_class=3, pool_mode="joint")
    v_joint = joint(z, t)
    assert len(joint_model.calls) == 1  # one forward: cond and uncond share the pool
    zj, tj, yj = joint_model.calls[0]
    assert torch.equal(zj, torch.cat([z, z])) and torch.equal(tj, torch.cat([t, t]))
    assert torch.equal(yj, torch.cat([y, null]))
    assert (joint.num_model_forwards, joint.num_model_samples) == (1, 6)

    sep_model = RecordingLinearModel(num_classes=3)
    sep = cfg_velocity_fn(sep_model, y, cfg_scale=2.0, null_class=3, pool_mode="separate")
    v_sep = sep(z, t)
    assert len(sep_model.calls) == 2  # cond batch, then uncond batch, each pooled alone
    (z1, t1, y1), (z2, t2, y2) = sep_model.calls
    assert torch.equal(z1, z) and torch.equal(z2, z) and torch.equal(t1, t) and torch.equal(t2, t)
    assert torch.equal(y1, y) and torch.equal(y2, null)
    assert (sep.num_model_forwards, sep.num_model_samples) == (2, 6)
    torch.testing.assert_close(v_joint, v_sep)  # same math for a per-sample (dense) model


def test_cfg_bad_input() -> None:
    model = RecordingLinearModel(num_classes=3)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        cfg_velocity_fn(model, y, 2.0, 3, pool_mode="shared")
    with pytest.raises(ValueError, match=r"y must lie in \[0, null_class = 3\], got min 0, max 4"):
        cfg_velocity_fn(model, torch.tensor([0, 4]), 2.0, 3)
    with pytest.raises(ValueError, match="cfg_scale must be finite"):
        cfg_velocity_fn(model, y, float("nan"), 3)
    with pytest.raises(ValueError, match="batch B = 2"):
        cfg_velocity_fn(model, y, 2.0, 3)(torch.zeros(3, 4, 1, 1), torch.zeros(3))


def test_cfg_drives_a_sampler_and_counts_compute() -> None:
    model = RecordingLinearModel(num_classes=3)
    z, _, y = _cfg_inputs()
    fn = cfg_velocity_fn(model, y, cfg_scale=1.5, null_class=3, pool_mode="separate")
    out = sample_heun(fn, z, num_steps=3)
    assert out.nfe == 6 == fn.num_calls and fn.num_model_forwards == 12
    assert out.x.shape == z.shape and torch.isfinite(out.x).all()
