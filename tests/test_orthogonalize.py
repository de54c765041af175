"""MUON_NS_STEPS = k runs a Polar Express schedule designed for k steps: the error against the exact polar factor
(SVD) falls with every step from 1 to 10, and five steps are nanochat's coefficients, as before."""

from __future__ import annotations

import pytest
import torch

import train

NANOCHAT_FIVE_STEPS = [  # the table train.py held before the schedules were computed
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_error(G, steps):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    return ((train.orthogonalize(G, steps).double() - polar).norm() / polar.norm()).item()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("shape", [(128, 128), (192, 64), (64, 192), (4, 96, 48)])
def test_error_against_the_polar_factor_falls_with_every_step(shape, seed):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    errors = [polar_error(G, k) for k in range(1, 11)]
    assert all(later < earlier or later < 1e-5 for earlier, later in zip(errors, errors[1:])), errors  # 1e-5: fp32
    assert errors[2] < 0.35 and errors[-1] < 0.01, errors  # three steps were 0.50 when they ran five steps' first three


def test_five_steps_are_the_coefficients_and_results_of_before():
    for ours, before in zip(train.POLAR_EXPRESS[5], NANOCHAT_FIVE_STEPS, strict=True):
        assert ours == pytest.approx(before, rel=1e-12)
    G = torch.randn(96, 48, generator=torch.Generator().manual_seed(2))
    X = G.float().mT / (G.norm() * 1.02 + 1e-6)
    for a, b, c in NANOCHAT_FIVE_STEPS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    torch.testing.assert_close(train.orthogonalize(G, 5), X.mT, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 7, 10])
def test_each_count_has_a_schedule_of_its_own(steps):
    schedule = train.POLAR_EXPRESS[steps]
    assert len(schedule) == steps
    assert schedule != train.POLAR_EXPRESS[steps + 1][:steps]  # not the first steps of a longer schedule


def test_many_steps_approach_the_newton_schulz_quintic():
    assert train.POLAR_EXPRESS[16][-1] == pytest.approx((15 / 8, -10 / 8, 3 / 8), rel=1e-6)
