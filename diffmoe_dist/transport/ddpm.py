"""DDPM as ADM / DiT train it: linear betas, epsilon prediction, learned range-interpolated variance,
the hybrid loss, ancestral sampling respaced to fewer steps, and DDIM.

Written from the formulas of Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM) and
Song et al. 2021 (DDIM), with DiT's settings (1000 steps, betas linspace(1e-4, 0.02), learn_sigma,
loss = MSE + VB, no rescaling of the VB term).

Time convention (NOT the flow's): an integer step t in {0, ..., T-1}, T = 1000, per sample, [B] long.
t = 0 is the least noisy step (nearly data), t = T - 1 nearly pure noise. The model receives the
integer step t itself (DiT: the sinusoidal timestep embedder gets t, not t / T); a respaced sampler
passes the ORIGINAL step of each respaced index (``timestep_map``).

    q(x_t | x_start) = N(sqrt(abar_t) x_start, (1 - abar_t) I),  abar_t = prod_{s <= t} (1 - beta_s)
    x_t = sqrt(abar_t) * x_start + sqrt(1 - abar_t) * noise

Names: ``x_start`` is the data (the DDPM papers' x_0; the trainer's x1) and ``noise`` the Gaussian
(the trainer's x0). Model output [B, 2C, ...]: channels [:C] are eps, [C:] the variance values v in
[-1, 1] (not clamped, as ADM): log sigma^2 = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2, with
beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) the posterior variance (its log "clipped": beta~_1 is
used at t = 0, where beta~_0 = 0).

Coefficients are computed in float64 and cast to the state's dtype when used (as ADM).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DDPM_NUM_TIMESTEPS",
    "DDPM_SAMPLERS",
    "GaussianDiffusion",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "normal_kl",
    "space_timesteps",
]

DDPM_NUM_TIMESTEPS = 1000
# The DDPM samplers, by config name (sample.sampler under objective ddpm): ancestral (respaced,
# GaussianDiffusion.sample_ancestral) and DDIM with eta 0 (sample_ddim). Defined here once.
DDPM_SAMPLERS = ("ddpm", "ddim")
BETA_START, BETA_END = 1e-4, 0.02

# model_fn(x_t [B, C, ...], model_t [B] long) -> [B, 2C, ...] (eps, variance values)
ModelOutFn = Callable[[Tensor, Tensor], Tensor]


def linear_betas(
    num_timesteps: int = DDPM_NUM_TIMESTEPS, start: float = BETA_START, end: float = BETA_END
) -> Tensor:
    """DDPM's linear schedule, float64 [T]: linspace(start, end) (DiT / ADM at T = 1000)."""
    # device="cpu" explicitly: the tables stay real even under a meta-device context (count_params).
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64, device="cpu")


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """The num_steps original steps an evenly respaced sampler visits (ascending).

    ADM's ``space_timesteps(T, [num_steps])``: indices round(i * (T - 1) / (num_steps - 1)), so the
    first (0) and last (T - 1) steps are always kept; num_steps = 1 keeps step 0.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(f"sample.num_steps must be an int, got {num_steps!r}")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sample.num_steps={num_steps} cannot respace the {num_timesteps} DDPM training steps "
            f"(needs 1 <= num_steps <= {num_timesteps})"
        )
    if num_steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (num_steps - 1)
    return [round(i * stride) for i in range(num_steps)]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) per element for data x in [-1, 1] quantised to 256 levels (bin width 2/255) under
    N(means, exp(log_scales)^2); the edge bins take the whole tail (DDPM section 3.3). In nats.

    The exact normal CDF (torch.special.ndtr / log_ndtr), where ADM uses a tanh approximation.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # log P(X <= x + 1/255): lowest bin
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # log P(X > x - 1/255): highest bin
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def _mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


class GaussianDiffusion:
    """One DDPM process with its own betas [N] (the full 1000-step one, or a respaced one).

    ``timestep_map`` [N] long: the original step the model receives for index i (identity for the
    full process). All per-step tables are float64 [N].
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None) -> None:
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.num_timesteps = n = betas.shape[0]
        self.timestep_map = (
            torch.arange(n, dtype=torch.long, device=betas.device)
            if timestep_map is None
            else timestep_map.long()
        )
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64, device=betas.device), self.alphas_cumprod[:-1]]
        )
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_start) = N(c1 x_start + c2 x_t, beta~_t).
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        pv = self.posterior_variance
        # beta~_0 = 0: its log is replaced by log beta~_1 (ADM's "clipped" log variance).
        self.posterior_log_variance_clipped = (
            torch.log(torch.cat([pv[1:2], pv[1:]])) if n > 1 else torch.log(betas)
        )
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)
        self.log_betas = torch.log(betas)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def linear(cls, num_timesteps: int = DDPM_NUM_TIMESTEPS) -> GaussianDiffusion:
        return cls(linear_betas(num_timesteps))

    def respaced(self, num_steps: int) -> GaussianDiffusion:
        """The process that visits only ``space_timesteps(T, num_steps)``, with betas chosen so its
        cumulative products equal the original abar at the kept steps:
        beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}} (abar_{s_{-1}} = 1)."""
        use = space_timesteps(self.num_timesteps, num_steps)
        kept = self.alphas_cumprod[use]
        prev = torch.cat([torch.ones(1, dtype=torch.float64, device=kept.device), kept[:-1]])
        return GaussianDiffusion(1.0 - kept / prev, self.timestep_map[use])

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """table[t] as [B, 1, ..., 1] in like's dtype (float64 kept for float64 states)."""
        v = table.to(t.device)[t].to(like.dtype)
        return v.reshape(t.shape[0], *([1] * (like.dim() - 1)))

    def _check_t(self, t: Tensor, x: Tensor) -> None:
        if t.dtype != torch.long or t.shape != (x.shape[0],):
            raise ValueError(
                f"DDPM t must be a long tensor [B] = [{x.shape[0]}], got {t.dtype} {tuple(t.shape)}"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"DDPM t must lie in [0, {self.num_timesteps - 1}], got [{int(t.min())}, {int(t.max())}]"
            )

    def model_time(self, t: Tensor) -> Tensor:
        """What the model receives for index t: the original integer step."""
        return self.timestep_map.to(t.device)[t]

    # ---- forward process ---------------------------------------------------------------------
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_start + sqrt(1 - abar_t) noise. x_start, noise [B, ...]; t [B] long."""
        self._check_t(t, x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"noise {tuple(noise.shape)} must match x_start {tuple(x_start.shape)}"
            )
        return (
            self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, clipped log variance) of q(x_{t-1} | x_t, x_start)."""
        mean = (
            self._at(self.posterior_mean_coef1, t, x_t) * x_start
            + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    # ---- reverse process ---------------------------------------------------------------------
    def split_output(self, model_out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 2C, ...] -> (eps [B, C, ...], variance values [B, C, ...])."""
        C = x_t.shape[1]
        if (
            model_out.shape[0] != x_t.shape[0]
            or model_out.shape[1] != 2 * C
            or model_out.shape[2:] != x_t.shape[2:]
        ):
            raise ValueError(
                f"DDPM with learned variance needs a model output [B, 2C, ...] = "
                f"{(x_t.shape[0], 2 * C, *x_t.shape[2:])}, got {tuple(model_out.shape)}"
            )
        return model_out[:, :C], model_out[:, C:]

    def p_mean_variance(
        self, model_out: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean, log variance, predicted x_start, eps) of p(x_{t-1} | x_t) from the model output.

        mean = posterior mean at x_start_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), which
        equals DDPM's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps).
        """
        eps, v = self.split_output(model_out, x_t)
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(self.log_betas, t, x_t)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        x_start = (
            self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )
        mean, _ = self.q_posterior(x_start, x_t, t)
        return mean, log_var, x_start, eps

    # ---- training ----------------------------------------------------------------------------
    def training_losses(
        self, model_out: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, noise: Tensor
    ) -> dict[str, Tensor]:
        """Per-sample hybrid loss terms, each [B] (float32 at least):

        mse = mean over dims of (noise - eps)^2;
        vb  = KL(q(x_{t-1} | x_t, x_start) || p(x_{t-1} | x_t)) in bits per dim for t > 0, and
              -log p(x_start | x_1) (discretized Gaussian) in bits per dim at t = 0, computed with
              eps DETACHED so the VB term trains only the variance (improved DDPM's L_hybrid);
        loss = mse + vb (DiT: lambda = 1, the VB term not rescaled).
        """
        self._check_t(t, x_start)
        if model_out.dtype not in (torch.float32, torch.float64):
            model_out = model_out.float()
        eps, v = self.split_output(model_out, x_t)
        mse = _mean_flat((noise - eps) ** 2)
        frozen = torch.cat([eps.detach(), v], dim=1)  # stop-gradient on the mean
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(frozen, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(
            discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)
        ) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    # ---- sampling ----------------------------------------------------------------------------
    def _loop(
        self,
        model_fn: ModelOutFn,
        x: Tensor,
        step: Callable[[Tensor, Tensor, Tensor, int], Tensor],
    ) -> tuple[Tensor, int]:
        nfe = 0
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = model_fn(x, self.model_time(t))
            nfe += 1
            x = step(out.to(x.dtype), x, t, i)
        return x, nfe

    def sample_ancestral(
        self, model_fn: ModelOutFn, noise: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, int]:
        """x_{i-1} = mean + sigma * z (z ~ N(0, I); none at the last step). NFE = number of steps."""

        def step(out: Tensor, x: Tensor, t: Tensor, i: int) -> Tensor:
            mean, log_var, _, _ = self.p_mean_variance(out, x, t)
            if i == 0:
                return mean
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            return mean + torch.exp(0.5 * log_var) * z

        return self._loop(model_fn, noise, step)

    def sample_ddim(
        self,
        model_fn: ModelOutFn,
        noise: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, int]:
        """DDIM (Song et al. eq. 12) on this process's steps; eta = 0 is deterministic.

        x_{prev} = sqrt(abar_prev) x_start_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
        The learned variance is not used (DDIM's own sigma replaces it).
        """

        def step(out: Tensor, x: Tensor, t: Tensor, i: int) -> Tensor:
            _, _, x_start, eps = self.p_mean_variance(out, x, t)
            ab = self._at(self.alphas_cumprod, t, x)
            ab_prev = self._at(self.alphas_cumprod_prev, t, x)
            sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
            x_new = ab_prev.sqrt() * x_start + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
            if i == 0 or eta == 0.0:
                return x_new
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            return x_new + sigma * z

        return self._loop(model_fn, noise, step)
