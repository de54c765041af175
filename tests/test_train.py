"""train.py: the orthogonaliser against an SVD, NorMuon, both optimizer paths against references, the
model's causality, and whole runs of train.py (marked slow)."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import train
from agent.backlog import Assignment
from agent.summary import parse_progress, parse_summary
from agent.train_constants import set_constants

REPO_ROOT = Path(__file__).resolve().parents[1]


def random_matrix(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


# ---------------------------------------------------------------------------
# Orthogonalisation and NorMuon
# ---------------------------------------------------------------------------

SHAPES = [(64, 64), (96, 32), (32, 96), (3, 48, 24)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [3, 5, 7])
def test_orthogonalize_keeps_the_singular_vectors_of_its_input(shape, steps):
    G = random_matrix(*shape)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    D = U.mT @ train.orthogonalize(G, steps).double() @ Vh.mT
    off_diagonal = D - torch.diag_embed(torch.diagonal(D, dim1=-2, dim2=-1))
    assert off_diagonal.norm() / D.norm() < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonalize_converges_to_the_svd_polar_factor(shape):
    G = random_matrix(*shape)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    errors = {steps: relative_error(train.orthogonalize(G, steps), U @ Vh) for steps in (3, 5, 7)}
    assert errors[3] < 0.6 and errors[5] < 0.2 and errors[7] < 0.1, errors
    assert errors[7] < errors[5] < errors[3], errors


def test_seven_steps_run_a_schedule_of_their_own():
    G = random_matrix(96, 32)
    seven = train.orthogonalize(G, 7)
    assert not torch.allclose(seven, train.orthogonalize(G, 6), atol=1e-4)
    assert not torch.allclose(seven, train.orthogonalize(G, 5), atol=1e-4)


@pytest.mark.parametrize("shape, red_dim", [((2, 8, 4), -1), ((2, 4, 8), -2)])
def test_normuon_rescale_keeps_the_frobenius_norm_and_lerps_the_second_moment(shape, red_dim):
    X = random_matrix(*shape)
    moment_shape = list(shape)
    moment_shape[red_dim] = 1
    second_moment = random_matrix(*moment_shape, seed=1).square() + 0.1
    old_moment, beta2 = second_moment.clone(), 0.9
    out = train.normuon_rescale(X, second_moment, beta2, red_dim)

    expected_moment = old_moment + (1 - beta2) * (X.square().mean(dim=red_dim, keepdim=True) - old_moment)
    torch.testing.assert_close(second_moment, expected_moment)
    scaled = X / expected_moment.sqrt()
    expected = scaled * X.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), X.norm(dim=(-2, -1)), atol=0, rtol=1e-5)
    neuron_scales = (out / X).mean(dim=red_dim)
    assert neuron_scales.std(dim=-1).min() > 0.05  # the neurons were rescaled, not the whole matrix


# ---------------------------------------------------------------------------
# MuonAdamW against references
# ---------------------------------------------------------------------------

def test_adamw_groups_match_torch_adamw():
    shapes = [(4, 3), (5,), (2, 2, 2)]
    initial = [random_matrix(*shape, seed=i) for i, shape in enumerate(shapes)]
    ours = [nn.Parameter(p.clone()) for p in initial]
    theirs = [nn.Parameter(p.clone()) for p in initial]
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    optimizer = train.MuonAdamW([dict(kind="adamw", params=ours, **hyper)])
    reference = torch.optim.AdamW(theirs, **hyper)
    for step in range(5):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            p.grad = random_matrix(*p.shape, seed=100 * step + i)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, q, start in zip(ours, theirs, initial):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        assert (p - start).abs().max() > 1e-3


def reference_muon_step(params, grads, state, lr, momentum, beta2, weight_decay, ns_steps):
    """One Muon step from its formulas, on stacked (count, rows, cols) tensors; updates state."""
    rows, cols = params.shape[-2:]
    red_dim = -1 if rows >= cols else -2
    state["buffer"] = state["buffer"] + (1 - momentum) * (grads - state["buffer"])
    nesterov = grads + momentum * (state["buffer"] - grads)
    update = train.normuon_rescale(train.orthogonalize(nesterov, ns_steps), state["moment"], beta2, red_dim)
    lr = lr * math.sqrt(max(1.0, rows / cols))
    agrees = (update * params) >= 0
    return params - lr * update - lr * weight_decay * params * agrees


@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])
def test_muon_group_matches_the_reference_formulas(shape):
    params = [nn.Parameter(random_matrix(*shape, seed=i)) for i in range(3)]
    hyper = dict(lr=0.02, momentum=0.9, beta2=0.95, weight_decay=0.3, ns_steps=5)
    optimizer = train.MuonAdamW([dict(kind="muon", params=params, **hyper)])
    expected = torch.stack([p.detach().clone() for p in params])
    moment_shape = (3, shape[0], 1) if shape[0] >= shape[1] else (3, 1, shape[1])
    state = dict(buffer=torch.zeros_like(expected), moment=torch.zeros(moment_shape))
    for step in range(2):
        grads = torch.stack([random_matrix(*shape, seed=10 + 3 * step + i) for i in range(3)])
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        expected = reference_muon_step(expected, grads, state, **hyper)
        torch.testing.assert_close(torch.stack([p.detach() for p in params]), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------

def random_gpt(window_pattern):
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                                      window_pattern=window_pattern))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # init_weights zeroes the output projections; mix for real
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("window_pattern", ["L", "SL"])
def test_logits_never_depend_on_later_tokens(window_pattern):
    model = random_gpt(window_pattern)
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
        for t in (0, 7, 20, 30):
            changed = tokens.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 64
            changed_logits = model(changed)
            torch.testing.assert_close(changed_logits[:, :t + 1], logits[:, :t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(changed_logits[:, t + 1:], logits[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_windowed_attention_equals_attention_with_an_explicit_band(window):
    q, k, v = (random_matrix(2, 3, 16, 8, seed=seed) for seed in range(3))
    i = torch.arange(16)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    scores = (q @ k.mT / math.sqrt(8)).masked_fill(~band, float("-inf"))
    expected = scores.softmax(dim=-1) @ v
    torch.testing.assert_close(train.windowed_attention(q, k, v, window), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Runs of train.py
# ---------------------------------------------------------------------------

def test_importing_train_does_not_train(run_python, prepared_builtin):
    started = time.monotonic()
    result = run_python("-c", "import train", env={"AUTORESEARCH_TIME_BUDGET": "1"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_train_runs_and_prints_every_summary_key(run_python, prepared_builtin, tmp_path):
    result = run_python("train.py", env={"AUTORESEARCH_TIME_BUDGET": "5", "AUTORESEARCH_RUN_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = parse_summary(result.stdout)
    assert summary is not None and summary.missing_keys == []
    assert math.isfinite(summary.val_bpb) and 0 < summary.val_bpb < 8
    assert summary["data_fingerprint"] == prepared_builtin["fingerprint"]
    assert summary["preset"] == "cpu"
    model = train.load_checkpoint(str(tmp_path / "checkpoint.pt"), device="cpu")
    assert model.num_params() / 1e6 == pytest.approx(summary.number("num_params_M"), abs=0.005)
    logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_nan_learning_rate_fails_fast_without_a_summary(run_python, prepared_builtin, tmp_path):
    source = (REPO_ROOT / "train.py").read_text()
    source = set_constants(source, [Assignment("MATRIX_LR", 'float("nan")'),
                                    Assignment("TOTAL_BATCH_SIZE", "2**11"), Assignment("DEVICE_BATCH_SIZE", "8")])
    (tmp_path / "train.py").write_text(source)
    shutil.copy(REPO_ROOT / "prepare.py", tmp_path / "prepare.py")
    result = run_python("train.py", cwd=tmp_path, env={"AUTORESEARCH_TIME_BUDGET": "60"}, timeout=120)
    assert result.returncode == 1
    assert "FAIL" in result.stdout
    assert parse_summary(result.stdout) is None and "---" not in result.stdout.splitlines()
    steps = [parse_progress(line) for line in result.stdout.splitlines() if parse_progress(line)]
    assert steps and steps[-1].remaining_seconds > 0
