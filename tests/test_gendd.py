"""GenDD's parts: Split Tokenization, Distribution Contraction, the head's start and its samplers."""

import pytest
import torch

from gendd_pipe.config import ConfigError
from gendd_pipe.distill.config import DistillConfig, parse_run
from gendd_pipe.distill.methods import TeacherHead, create_method
from gendd_pipe.distill.methods.gendd import GenddConfig
from gendd_pipe.models.diffusion import GaussianDiffusion
from gendd_pipe.models.gendd_head import DiffusionHead, HeadConfig, SamplingConfig
from gendd_pipe.models.student import StudentConfig, create_student
from tests.helpers import per_row_net

SMALL = HeadConfig(depth=2, width=64, token_dim=4, diffusion_batch_mul=3)


def test_split_tokenization_shapes_and_positions():
    head = DiffusionHead(12, 5, SMALL)  # 3 tokens of 4 dims
    target = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)
    cond = torch.randn(2, 5)
    tokens, conds, pos = head.tokenize(target, cond)
    assert tokens.shape == (6, 4) and conds.shape == (6, 5) and pos.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(tokens[4], target[1, 4:8])  # row b*T + j holds dims j*4..(j+1)*4 of sample b
    assert torch.equal(conds[4], cond[1])
    with pytest.raises(ValueError, match="not divisible by token_dim 4"):
        DiffusionHead(10, 5, SMALL)


def test_head_starts_as_the_identity_and_its_loss_is_the_noise_energy():
    torch.manual_seed(0)
    head = DiffusionHead(64, 8, HeadConfig(depth=2, width=32, token_dim=16, diffusion_batch_mul=50))
    out = per_row_net(head.net, torch.randn(5, 16), torch.tensor([0, 10, 100, 500, 999]), torch.randn(5, 8),
                      torch.arange(5) % 4)
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer
    tokens, conds, pos = head.tokenize(torch.randn(400, 64), torch.randn(400, 8))
    t = torch.randint(0, 1000, (tokens.shape[0],))
    parts = head.train_diffusion.training_losses(lambda x, ts: per_row_net(head.net, x, ts, conds, pos), tokens, t)
    assert parts["mse"].mean().item() == pytest.approx(1.0, abs=0.05)  # predicting eps = 0 costs E[eps^2] = 1
    assert head(torch.randn(32, 64), torch.randn(32, 8)).item() > parts["mse"].mean().item() - 0.1  # plus vb


def test_sampling_shapes_guidance_and_ddim_determinism():
    torch.manual_seed(0)
    head = DiffusionHead(12, 5, SMALL)
    cond = torch.randn(3, 5)
    assert head.sample(cond, SamplingConfig(sampling_steps=4)).shape == (3, 12)
    assert head.sample(cond, SamplingConfig(cfg=1.0, sampling_steps=2)).shape == (3, 12)
    torch.manual_seed(1)
    a = head.sample(cond, SamplingConfig(sampling_steps=4, sampler="ddim"))
    torch.manual_seed(1)
    b = head.sample(cond, SamplingConfig(sampling_steps=4, sampler="ddim"))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="'ddpm' or 'ddim'"):
        SamplingConfig(sampler="euler")
    with pytest.raises(ConfigError, match="gendd: predict.sampling_steps 2000 exceeds head.train_steps 1000"):
        parse_run({"gendd": {"predict": {"sampling_steps": 2000}}}, "distill.runs.gendd")


def _gendd(supervised=True, **kwargs):
    torch.manual_seed(0)
    student = create_student(StudentConfig("resnet10t", 32), num_classes=3)
    weight = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]).repeat(1, 16)  # (3, 64)
    teacher = TeacherHead(weight, torch.zeros(3), feature_norm=10.0)
    cfg = DistillConfig(method="gendd", unsupervised=not supervised, epochs=3,
                        options=GenddConfig(head=HeadConfig(depth=1, width=32), **kwargs))
    return create_method(cfg, student, teacher)


def test_distribution_contraction_target():
    method = _gendd(smooth=0.9)
    feature = torch.randn(2, 64)
    label = torch.tensor([2, 0])
    expected = 0.1 * feature + 0.9 * method.head_weight[label]
    assert torch.allclose(method.contract(feature, label), expected)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected_soft = 0.1 * feature + 0.9 * (soft @ method.head_weight)
    assert torch.allclose(method.contract(feature, soft), expected_soft)
    assert torch.equal(_gendd(supervised=False, smooth=0.9).contract(feature, label), feature)  # smooth 0


def test_scaled_centers_have_the_feature_norm():
    method = _gendd(centers="scaled")
    assert torch.allclose(method.centers.norm(dim=1), torch.full((3,), 10.0))
    assert torch.allclose(torch.nn.functional.normalize(method.centers, dim=1),
                          torch.nn.functional.normalize(method.head_weight, dim=1))


def test_gendd_loss_and_predictors():
    method = _gendd()
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 1]), "feature": torch.randn(4, 64)}
    losses = method.loss(batch, epoch=0)
    assert set(losses) == {"loss", "diffusion", "ce"} and losses["loss"].requires_grad
    losses["loss"].backward()
    fc = method.student.model.get_classifier()
    assert fc.weight.grad is not None  # the own head learns from CE ...
    assert method.diffusion.net.final_linear.weight.grad.abs().sum() > 0  # ... the head from the diffusion loss
    method.eval()
    out = method.predict(method.student.features(batch["image"]), SamplingConfig(sampling_steps=2, samples=2))
    assert out["student"].shape == (4, 3) and out["gendd"].shape == (4, 3)


def test_stage1_trains_into_the_frozen_teacher_classifier():
    method = _gendd(stage1_epochs=2)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 1]), "feature": torch.randn(4, 64)}
    losses = method.loss(batch, epoch=1)
    assert set(losses) == {"loss", "stage1_ce"}
    losses["loss"].backward()
    assert method.stage1_proj.weight.grad is not None and method.diffusion.net.final_linear.weight.grad is None
    assert set(method.loss(batch, epoch=2)) == {"loss", "diffusion", "ce"}


def _per_row_loss(head, target, cond):
    tokens, conds, pos = head.tokenize(target, cond)
    copies = head.config.diffusion_batch_mul
    tokens, conds, pos = tokens.repeat(copies, 1), conds.repeat(copies, 1), pos.repeat(copies)
    conds = conds * (torch.rand(conds.shape[0], 1) >= head.config.cond_drop).to(conds.dtype)
    t = torch.randint(0, head.train_diffusion.num_timesteps, (tokens.shape[0],))
    net = lambda x, ts: per_row_net(head.net, x, ts, conds, pos)  # noqa: E731
    return head.train_diffusion.training_losses(net, tokens, t)["loss"].mean()


def _per_row_sample(head, cond, sampling):
    _, conds, pos = head.tokenize(cond.new_zeros(cond.shape[0], head.target_dim), cond)

    def model(x, t):
        if sampling.cfg == 1.0:
            return per_row_net(head.net, x, t, conds, pos)
        both = per_row_net(head.net, torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([conds, torch.zeros_like(conds)]), torch.cat([pos, pos]))
        (eps_c, var_c), (eps_u, _) = (half.chunk(2, dim=-1) for half in both.chunk(2))
        return torch.cat([eps_u + sampling.cfg * (eps_c - eps_u), var_c], dim=-1)

    diffusion = GaussianDiffusion.respaced(head.config.train_steps, sampling.sampling_steps)
    noise = torch.randn(conds.shape[0], head.config.token_dim)
    if sampling.sampler == "ddim":
        return diffusion.ddim_sample_loop(model, noise).reshape(cond.shape[0], -1)
    return diffusion.p_sample_loop(model, noise, sampling.temperature).reshape(cond.shape[0], -1)


@pytest.mark.parametrize("batch", [4, 40])  # 120 rows, and 1200: more than the 1000 timesteps (a looked-up table)
def test_the_head_with_cached_conditions_equals_the_per_row_form_on_the_same_seeds(batch):
    torch.manual_seed(0)
    head = DiffusionHead(12, 5, HeadConfig(depth=2, width=48, token_dim=4, diffusion_batch_mul=10))
    for p in head.parameters():  # away from the zero start, so that every part of the network counts
        torch.nn.init.normal_(p, std=0.05)
    target, cond = torch.randn(batch, 12), torch.randn(batch, 5)
    torch.manual_seed(1)
    head.zero_grad()
    loss = head(target, cond)
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    torch.manual_seed(1)
    head.zero_grad()
    expected = _per_row_loss(head, target, cond)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (p.grad for p in head.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for sampling in (SamplingConfig(sampling_steps=8), SamplingConfig(sampling_steps=8, cfg=1.0),
                     SamplingConfig(sampling_steps=5, sampler="ddim")):
        torch.manual_seed(2)
        got = head.sample(cond, sampling)
        torch.manual_seed(2)
        torch.testing.assert_close(got, _per_row_sample(head, cond, sampling), rtol=1e-4, atol=1e-5)
