"""Each distillation loss against values computed by hand on small tensors."""

import math

import pytest
import torch

from gendd_pipe.distill.methods.losses import dkd_loss, gdkd_loss, kd_loss, standardize, topk_mask


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


S = [1.0, 0.0, -1.0]  # student logits, one sample
T = [0.2, 2.0, -0.5]  # teacher logits


def test_kd_by_hand():
    assert kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]]), 1.0).item() == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    expected = kl(softmax([t / 4 for t in T]), softmax([s / 4 for s in S])) * 16
    assert kd_loss(torch.tensor([S]), torch.tensor([T]), 4.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_a_batch_mean():
    s, t = torch.tensor([S, T]), torch.tensor([T, T])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(kl(softmax(T), softmax(S)) / 2, rel=1e-5)


def test_dkd_by_hand():
    temp, target = 2.0, 0
    ps, pt = softmax([s / temp for s in S]), softmax([t / temp for t in T])
    tckd = kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = kl(softmax([t / temp for t in T[1:]]), softmax([s / temp for s in S[1:]]))
    got = dkd_loss(torch.tensor([S]), torch.tensor([T]), torch.tensor([target]), 1.0, 8.0, temp)
    assert got.item() == pytest.approx((tckd + 8.0 * nckd) * temp**2, rel=1e-5)


def test_gdkd_by_hand():
    temp = 1.5
    s4, t4 = S + [0.5], T + [1.0]  # teacher top-2: classes 1 and 3
    assert topk_mask(torch.tensor([t4]), 2).tolist() == [[False, True, False, True]]
    ps, pt = softmax([s / temp for s in s4]), softmax([t / temp for t in t4])
    partition = kl([pt[1] + pt[3], pt[0] + pt[2]], [ps[1] + ps[3], ps[0] + ps[2]])
    inside = kl(softmax([t4[1] / temp, t4[3] / temp]), softmax([s4[1] / temp, s4[3] / temp]))
    outside = kl(softmax([t4[0] / temp, t4[2] / temp]), softmax([s4[0] / temp, s4[2] / temp]))
    got = gdkd_loss(torch.tensor([s4]), torch.tensor([t4]), 2, 0.5, 1.0, 2.0, temp)
    assert got.item() == pytest.approx((0.5 * partition + inside + 2.0 * outside) * temp**2, rel=1e-5)


def test_gdkd_with_top1_on_the_label_is_dkd():
    torch.manual_seed(0)
    teacher = torch.randn(16, 10)
    student = torch.randn(16, 10)
    target = teacher.argmax(1)
    assert gdkd_loss(student, teacher, 1, 1.0, 3.0, 8.0, 4.0).item() == pytest.approx(
        dkd_loss(student, teacher, target, 1.0, 8.0, 4.0).item(), rel=1e-5)


def test_standardize():
    z = standardize(torch.tensor([[1.0, 2.0, 6.0], [0.0, -3.0, 3.0]]))
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(z.std(1), torch.ones(2), atol=1e-5)
    assert kd_loss(standardize(torch.tensor([T])), standardize(torch.tensor([T]) * 5 + 3), 2.0).item() == pytest.approx(
        0.0, abs=1e-6)
