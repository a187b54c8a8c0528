"""GenDD's conditional diffusion head: a small adaLN MLP that denoises 64-dim feature tokens.

The network is MAR's ``SimpleMLPAdaLN`` (Li et al. 2024, "Autoregressive Image
Generation without Vector Quantization"): residual MLP blocks whose LayerNorm
shift, scale and gate come from the condition, zero-initialised modulation and
output so that training starts from the identity. The condition is the student
feature, plus the timestep embedding, plus an embedding of the token position
(Split Tokenization cuts a D-dim teacher feature into D / token_dim tokens and
one head serves them all, so it is told which token it denoises).

`DiffusionHead` owns the network, the training diffusion (cosine, 1000 steps)
and a respaced sampling diffusion, with ``forward(target, cond) -> loss`` and
``sample(cond) -> features`` (GenDD, arXiv 2507.14503, Sec. 3).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from torch import nn

from gendd_pipe.config import NonNegativeFloat, PositiveFloat, PositiveInt, Probability, configclass
from gendd_pipe.models.diffusion import GaussianDiffusion


@configclass
class HeadConfig:
    """The diffusion head and its training diffusion (defaults: the official GenDD settings)."""

    depth: PositiveInt = 3  # residual adaLN blocks
    width: PositiveInt = 1024  # hidden width of the MLP
    token_dim: PositiveInt = 64  # Split Tokenization: dims per token; the teacher dim must divide by it
    train_steps: PositiveInt = 1000  # diffusion steps of the training schedule (cosine)
    diffusion_batch_mul: PositiveInt = 10  # copies of each token per step, each with its own noise and timestep
    cond_drop: Probability = 0.2  # probability of dropping the condition in training (classifier-free guidance)


@configclass
class SamplingConfig:
    """How teacher features are sampled from the head (defaults: the official GenDD settings)."""

    sampling_steps: PositiveInt = 64  # respaced steps (at most the head's train_steps)
    cfg: NonNegativeFloat = 2.0  # classifier-free guidance scale; 1.0 samples without guidance
    temperature: PositiveFloat = 1.0  # scale of the noise added at each ancestral step
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # ddpm: ancestral | ddim: deterministic (eta 0)
    samples: PositiveInt = 1  # sampled features averaged per image


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (integer) timestep followed by a two-layer MLP."""

    def __init__(self, width: int, frequencies: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequencies, self.max_period = frequencies, max_period
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)  # (F/2,)
        args = t.float()[:, None] * freqs[None]  # (N, F/2)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (N, W)


class AdaLNBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), its shift, scale and gate made from the condition by its
    own (zero-initialised) modulation, so that it starts as the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)  # 3 x (N, W)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))  # (N, W)


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: noisy tokens, the timestep and the condition (student feature and token position) ->
    epsilon and the variance interpolation.

    A row's condition is ``time_embed(t) + cond_embed(cond) + pos_embed(pos)``. Its time-free part
    (`condition`) depends only on the sample and the token, so the head computes it once per (sample, token)
    and reuses it over the ``diffusion_batch_mul`` copies and every sampling step; the time part
    (`embed_time`) runs once per distinct timestep.

    Args:
        in_channels: token dimension.
        width: hidden width.
        cond_channels: dimension of the condition (the projected student feature).
        depth: number of `AdaLNBlock`.
        num_tokens: number of token positions.
    """

    def __init__(self, in_channels: int, width: int, cond_channels: int, depth: int, num_tokens: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_channels, width)
        self.pos_embed = nn.Embedding(num_tokens, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_linear = nn.Linear(width, 2 * in_channels)  # epsilon and the variance interpolation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=1.0)  # N(0, 1): nn.Embedding's own, as the official head has it
        # zero modulation and output: every block starts as the identity and the output as 0
        for linear in [*(b.modulation[-1] for b in self.blocks), self.final_modulation[-1], self.final_linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def condition(self, cond: torch.Tensor, copies: int = 1, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The time-free part of the condition of every token of conditions (B, Dc): (copies * B * T, W), row
        ``k*B*T + b*T + j`` for token ``j`` of sample ``b`` (Split Tokenization's order, `copies` times over).
        Rows where ``keep`` (N, 1) is False have the condition dropped (classifier-free guidance: the zero
        vector's embedding, ``cond_embed``'s bias)."""
        b, tokens = cond.shape[0], self.pos_embed.num_embeddings
        pos = self.pos_embed.weight  # (T, W)
        full = (self.cond_embed(cond)[:, None] + pos[None]).reshape(b * tokens, -1).repeat(copies, 1)  # (N, W)
        if keep is None:
            return full
        dropped = (self.cond_embed.bias + pos).repeat(copies * b, 1)  # (N, W)
        return torch.where(keep, full, dropped)

    def embed_time(self, t: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The time part of the condition, (N, W), of timesteps (N,); with ``steps`` (the timesteps lie in
        ``[0, steps)``) and more rows than that, the MLP runs once per timestep and the rows look it up."""
        if steps is not None and t.numel() > steps:
            return self.time_embed(torch.arange(steps, device=t.device))[t]
        return self.time_embed(t)

    def forward(self, x: torch.Tensor, time: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The output (N, 2C) for noisy tokens (N, C), given the condition's time part (N or 1, W) and its
        time-free part (N, W)."""
        c = time + condition  # (N, W)
        h = self.input_proj(x)  # (N, W)
        for block in self.blocks:
            h = block(h, c)  # (N, W)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)  # 2 x (N, W)
        return self.final_linear(modulate(self.final_norm(h), shift, scale))  # (N, 2C)


@lru_cache(maxsize=16)
def _sampling_diffusion(steps: int, sampling: int, device: str) -> GaussianDiffusion:
    return GaussianDiffusion.respaced(steps, sampling).to(device)


class DiffusionHead(nn.Module):
    """Learns p(teacher feature | student feature) token by token; samples features from it.

    Args:
        target_dim: teacher feature dimension D (divisible by ``config.token_dim``).
        cond_dim: condition dimension (the student feature after its LayerNorm projector).
        config: `HeadConfig`.
    """

    def __init__(self, target_dim: int, cond_dim: int, config: HeadConfig):
        super().__init__()
        if target_dim % config.token_dim:
            raise ValueError(f"teacher feature dim {target_dim} is not divisible by token_dim {config.token_dim}")
        self.config, self.target_dim = config, target_dim
        self.num_tokens = target_dim // config.token_dim
        self.net = SimpleMLPAdaLN(config.token_dim, config.width, cond_dim, config.depth, self.num_tokens)
        self.train_diffusion = GaussianDiffusion.cosine(config.train_steps)

    def tokenize(self, target: torch.Tensor, cond: torch.Tensor):
        """Split Tokenization: (B, D) targets and (B, Dc) conditions -> one row per token.

        Returns tokens (B*T, token_dim), conditions (B*T, Dc) and positions (B*T,), row
        ``b * T + j`` holding token ``j`` (dims ``j*token_dim .. (j+1)*token_dim``) of sample ``b``.
        """
        b, t = target.shape[0], self.num_tokens
        tokens = target.reshape(b * t, self.config.token_dim)  # (B*T, C)
        conds = cond.repeat_interleave(t, dim=0)  # (B*T, Dc)
        pos = torch.arange(t, device=target.device).repeat(b)  # (B*T,)
        return tokens, conds, pos

    def forward(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The diffusion loss of teacher features ``target`` (B, D) given conditions ``cond`` (B, Dc)."""
        copies = self.config.diffusion_batch_mul
        tokens = target.reshape(-1, self.config.token_dim).repeat(copies, 1)  # (M*B*T, C), rows as in `tokenize`
        n = tokens.shape[0]
        keep = torch.rand(n, 1, device=cond.device) >= self.config.cond_drop  # a dropped condition: the zero vector
        t = torch.randint(0, self.train_diffusion.num_timesteps, (n,), device=tokens.device)
        condition = self.net.condition(cond, copies, keep)  # (N, W)
        time = self.net.embed_time(t, self.train_diffusion.num_timesteps)  # (N, W)
        diffusion = self.train_diffusion.to(tokens.device)
        losses = diffusion.training_losses(lambda x, ts: self.net(x, time, condition), tokens, t)
        return losses["loss"].mean()

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, sampling: SamplingConfig = SamplingConfig()) -> torch.Tensor:
        """Sample teacher features (B, D) for conditions (B, Dc), one draw each (``sampling.samples`` is the
        caller's)."""
        scale, b = sampling.cfg, cond.shape[0]  # (the guidance scale keeps its official name, cfg)
        condition = self.net.condition(cond)  # (B*T, W), once for every step
        if scale != 1.0:  # conditioned rows, then unconditioned ones
            dropped = torch.zeros(b * self.num_tokens, 1, dtype=torch.bool, device=cond.device)
            condition = torch.cat([condition, self.net.condition(cond, 1, dropped)])

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            time = self.net.embed_time(t[:1])  # (1, W): the samplers step every row at one timestep
            if scale == 1.0:
                return self.net(x, time, condition)
            both = self.net(torch.cat([x, x]), time, condition)  # (2N, 2C)
            (eps_c, var_c), (eps_u, _) = (half.chunk(2, dim=-1) for half in both.chunk(2))
            return torch.cat([eps_u + scale * (eps_c - eps_u), var_c], dim=-1)  # (N, 2C)

        diffusion = _sampling_diffusion(self.config.train_steps, sampling.sampling_steps, str(cond.device))
        noise = torch.randn(b * self.num_tokens, self.config.token_dim, device=cond.device)  # float32 under autocast too
        if sampling.sampler == "ddim":
            tokens = diffusion.ddim_sample_loop(model, noise)
        else:
            tokens = diffusion.p_sample_loop(model, noise, sampling.temperature)
        return tokens.reshape(b, self.target_dim)  # (B, D)
