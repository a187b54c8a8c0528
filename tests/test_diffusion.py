"""The diffusion maths against closed forms, and samplers against a known 1-D Gaussian mixture."""

import itertools
import math

import numpy as np
import pytest
import torch

from gendd_pipe.models.diffusion import GaussianDiffusion, cosine_betas, spaced_steps


def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def test_cosine_schedule_telescopes_to_alpha_bar():
    diffusion = GaussianDiffusion.cosine(1000)
    acp = diffusion.alphas_cumprod.numpy()
    expected = np.array([alpha_bar((i + 1) / 1000) / alpha_bar(0) for i in range(999)])
    np.testing.assert_allclose(acp[:999], expected, rtol=1e-9)
    assert cosine_betas(1000).max() == pytest.approx(0.999)  # the clipped last step


def test_forward_marginals_match_closed_form():
    diffusion = GaussianDiffusion.cosine(1000)
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1), 1.5)
    for step in (0, 250, 700):
        t = torch.full((x0.shape[0],), step)
        xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
        a = alpha_bar((step + 1) / 1000) / alpha_bar(0)
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 1.5, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - a, rel=0.02, abs=1e-3)
        mean, var = diffusion.q_mean_variance(x0[:1], t[:1])
        assert mean.item() == pytest.approx(math.sqrt(a) * 1.5, rel=1e-6)
        assert var.item() == pytest.approx(1 - a, rel=1e-6, abs=1e-7)


def test_posterior_is_bayes_rule():
    diffusion = GaussianDiffusion.cosine(1000)
    acp, betas = diffusion.alphas_cumprod.numpy(), diffusion.betas.numpy()
    x0, xt = torch.tensor([[0.7]]), torch.tensor([[-0.4]])
    for step in (1, 10, 500, 998):
        prior_var = 1 - acp[step - 1]  # q(x_{t-1} | x_0)
        precision = 1 / prior_var + (1 - betas[step]) / betas[step]
        var = 1 / precision
        mean = var * (math.sqrt(acp[step - 1]) * 0.7 / prior_var + math.sqrt(1 - betas[step]) * -0.4 / betas[step])
        got_mean, got_var, got_log_var = diffusion.q_posterior(x0, xt, torch.tensor([step]))
        assert got_mean.item() == pytest.approx(mean, rel=1e-5)
        assert got_var.item() == pytest.approx(var, rel=1e-5)
        assert got_log_var.item() == pytest.approx(math.log(var), rel=1e-5)


def test_respacing_keeps_alpha_bar_of_the_kept_steps():
    keep = spaced_steps(1000, 64)
    assert len(keep) == 64 and keep[0] == 0 and keep[-1] == 999
    spaced, full = GaussianDiffusion.respaced(1000, 64), GaussianDiffusion.cosine(1000)
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), full.alphas_cumprod.numpy()[keep], rtol=1e-9)
    assert spaced.timestep_map.tolist() == keep


def official_space_timesteps(steps: int, count: int) -> set[int]:
    """Improved DDPM's rule for one section, derived again: positions 0, s, s + s, ... (a running float sum,
    s = (steps - 1) / (count - 1), or 1 for one step), each rounded half to even."""
    stride = (steps - 1) / (count - 1) if count > 1 else 1
    return {round(p) for p in itertools.accumulate(itertools.repeat(stride, count - 1), initial=0.0)}


def test_respacing_keeps_the_official_timesteps_for_every_count():
    assert spaced_steps(1000, 1) == [0] and spaced_steps(1000, 2) == [0, 999]
    assert spaced_steps(1000, 3) == [0, 500, 999]  # 499.5 rounds to even
    for count in range(1, 1001):
        keep = spaced_steps(1000, count)
        assert keep == sorted(official_space_timesteps(1000, count)) and len(keep) == count, count
    with pytest.raises(ValueError, match="sampling steps"):
        spaced_steps(1000, 1001)


def test_perfect_model_has_zero_loss():
    diffusion = GaussianDiffusion.cosine(1000)
    x0 = torch.randn(64, 8)
    noise = torch.randn_like(x0)
    t = torch.randint(1, 1000, (64,))
    # true epsilon, and v = -1 selects the posterior variance
    losses = diffusion.training_losses(lambda x, ts: torch.cat([noise, -torch.ones_like(x)], -1), x0, t, noise)
    assert losses["mse"].abs().max().item() < 1e-10
    assert losses["vb"].abs().max().item() < 1e-4
    wrong = diffusion.training_losses(lambda x, ts: torch.zeros(x.shape[0], 16), x0, t, noise)
    assert wrong["mse"].mean().item() == pytest.approx(1.0, abs=0.15)


WEIGHTS, MEANS, STDS = np.array([0.3, 0.7]), np.array([-2.0, 1.5]), np.array([0.5, 0.3])


def mixture_eps(acp: torch.Tensor):
    """The exact epsilon-prediction for data from the 1-D mixture: -sqrt(1 - a) * score of p(x_t)."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = acp[t].unsqueeze(1)  # (N, 1)
        mu = torch.tensor(MEANS) * a.sqrt()  # (N, K)
        var = torch.tensor(STDS) ** 2 * a + (1 - a)  # (N, K)
        log_w = torch.log(torch.tensor(WEIGHTS)) - 0.5 * torch.log(var) - (x - mu) ** 2 / (2 * var)
        resp = torch.softmax(log_w, dim=1)
        score = (resp * -(x - mu) / var).sum(1, keepdim=True)
        eps = -(1 - a).sqrt() * score
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_reproduces_a_gaussian_mixture(sampler):
    torch.manual_seed(0)
    train = GaussianDiffusion.cosine(1000)
    spaced = GaussianDiffusion.respaced(1000, 100)
    noise = torch.randn(20_000, 1, dtype=torch.float64)
    model = mixture_eps(train.alphas_cumprod)
    x = spaced.p_sample_loop(model, noise) if sampler == "ddpm" else spaced.ddim_sample_loop(model, noise)
    mean = (WEIGHTS * MEANS).sum()
    var = (WEIGHTS * (STDS**2 + MEANS**2)).sum() - mean**2
    assert x.mean().item() == pytest.approx(mean, abs=0.05)
    assert x.var().item() == pytest.approx(var, rel=0.05)
    assert (x < 0).double().mean().item() == pytest.approx(0.3, abs=0.015)
    left = x[x < 0]
    assert left.std().item() == pytest.approx(0.5, rel=0.1)
