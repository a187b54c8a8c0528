"""Gaussian diffusion on feature tokens: the maths of GenDD's diffusion head in one module.

It follows improved DDPM (Nichol & Dhariwal 2021) as DiT and MAR use it and as
GenDD's ``DiffLoss`` builds it: a cosine noise schedule over 1000 training
steps, an epsilon-predicting network with *learned-range* variance (the network
outputs ``2 * C`` channels: epsilon and an interpolation ``v`` between the
posterior variance and ``beta_t``), the hybrid loss ``MSE(eps) + L_vb`` with the
mean frozen inside ``L_vb``, and sampling on a respaced schedule (a subset of
the training steps with betas recomputed from the kept ``alpha_bar``).

Samplers: ancestral (``p_sample``, noise scaled by a temperature, as MAR does)
and DDIM with ``eta = 0`` (deterministic). Classifier-free guidance lives in the
model function handed to a sampler, so the sampler only sees ``(x, t) -> out``.

diffusers' schedulers cover the sampling side only; the learned-variance
training loss has no counterpart there, so both sides live here, where one set
of tensors serves training and sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> (N, 2C): eps, v


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule: alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2), s = 0.008."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)])


def spaced_steps(steps: int, sampling: int) -> list[int]:
    """The training steps a ``sampling``-step schedule keeps, spread over ``[0, steps)``.

    Improved DDPM's ``space_timesteps(steps, "sampling")`` (one section), which the
    official code samples with: a position that starts at 0 and advances by
    ``(steps - 1) / (sampling - 1)`` (by 1 for a single step, which keeps step 0),
    each position rounded half to even. The position is a running float sum, not
    ``i * stride``: the two round apart for about a quarter of the counts. Both
    samplers use this schedule.
    """
    if not 1 <= sampling <= steps:
        raise ValueError(f"sampling steps must be in [1, {steps}], got {sampling}")
    stride = (steps - 1) / (sampling - 1) if sampling > 1 else 1.0
    kept, position = set(), 0.0
    for _ in range(sampling):
        kept.add(round(position))
        position += stride
    return sorted(kept)


def _take(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``values[t]`` broadcast against ``x`` (N, ...)."""
    out = values.to(x.device)[t].to(x.dtype)
    return out.reshape(-1, *([1] * (x.dim() - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of ``x`` under a Gaussian integrated over bins of width 2/255 (improved DDPM's
    decoder term at t = 0), elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


class GaussianDiffusion:
    """A discrete Gaussian diffusion defined by its betas, with a map to the model's time index.

    Args:
        betas: (T,) noise schedule.
        timestep_map: the training-step index the model is given for each step here
            (identity for the training diffusion, the kept steps for a respaced one).
    """

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        as_t = lambda a: torch.tensor(a, dtype=torch.float64)
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = as_t(betas), as_t(acp), as_t(acp_prev)
        self.posterior_variance = as_t(post_var)
        # log of the posterior variance, with the t = 0 value (0) replaced by the t = 1 value
        self.posterior_log_variance_clipped = as_t(np.log(np.append(post_var[1], post_var[1:])))
        self.posterior_mean_coef1 = as_t(betas * np.sqrt(acp_prev) / (1.0 - acp))
        self.posterior_mean_coef2 = as_t((1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp))
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)))

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """The schedule's tables moved to ``device`` (in place; returned), so that steps there copy nothing."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

    @classmethod
    def cosine(cls, steps: int = 1000) -> GaussianDiffusion:
        """The training diffusion: cosine schedule, ``steps`` steps."""
        return cls(cosine_betas(steps))

    @classmethod
    def respaced(cls, steps: int, sampling: int) -> GaussianDiffusion:
        """A ``sampling``-step diffusion over the same alpha_bar as ``cosine(steps)``."""
        keep = spaced_steps(steps, sampling)
        acp = np.cumprod(1.0 - cosine_betas(steps))
        kept = acp[keep]
        betas = 1.0 - kept / np.append(1.0, kept[:-1])
        return cls(betas, keep)

    # forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_t | x_0)."""
        acp = _take(self.alphas_cumprod, t, x_start)
        return acp.sqrt() * x_start, (1.0 - acp).expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise."""
        acp = _take(self.alphas_cumprod, t, x_start)
        return acp.sqrt() * x_start + (1.0 - acp).sqrt() * noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _take(self.posterior_mean_coef1, t, x_t) * x_start + _take(self.posterior_mean_coef2, t, x_t) * x_t
        return (mean, _take(self.posterior_variance, t, x_t).expand_as(x_t),
                _take(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t))

    # reverse process
    def _model_out(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the network may run under autocast; the diffusion maths (posterior, KL, likelihood, sampling steps)
        # stay in float32, as the official code's float32 schedule tensors keep them
        return model(x, self.timestep_map.to(x.device)[t]).float()

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """p(x_{t-1} | x_t) from the network output (N, 2C): epsilon, then the variance interpolation v."""
        eps, v = out.chunk(2, dim=-1)
        min_log = _take(self.posterior_log_variance_clipped, t, x_t)
        max_log = _take(self.betas.log(), t, x_t)
        frac = (v + 1) / 2  # v in [-1, 1] moves the log-variance from the posterior's to beta_t
        log_variance = frac * max_log + (1 - frac) * min_log
        acp = _take(self.alphas_cumprod, t, x_t)
        pred_xstart = (x_t - (1.0 - acp).sqrt() * eps) / acp.sqrt()
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-row hybrid loss: ``mse`` of epsilon plus ``vb`` (bits/dim, mean held fixed), and their sum."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = self._model_out(model, x_t, t)
        eps, v = out.chunk(2, dim=-1)
        mse = (noise - eps).pow(2).mean(dim=-1)  # (N,)
        # the variance learns through L_vb only: the mean comes from a detached epsilon
        frozen = self.p_mean_variance(torch.cat([eps.detach(), v], dim=-1), x_t, t)
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_var, frozen["mean"], frozen["log_variance"]).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x_start, frozen["mean"], 0.5 * frozen["log_variance"]).mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    @torch.no_grad()
    def p_sample_loop(self, model: ModelFn, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Ancestral sampling from x_T = ``noise`` down to x_0; the added noise is scaled by ``temperature``."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(self._model_out(model, x, t), x, t)
            x = out["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * out["log_variance"]) * torch.randn_like(x) * temperature
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model: ModelFn, noise: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from x_T = ``noise`` down to x_0."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(self._model_out(model, x, t), x, t)
            acp_prev = _take(self.alphas_cumprod_prev, t, x)
            x = acp_prev.sqrt() * out["pred_xstart"] + (1.0 - acp_prev).sqrt() * out["eps"]
        return x
