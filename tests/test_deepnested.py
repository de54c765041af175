"""DeepNestedOptimizer: equal to MuonAdamW at init, roles by module type, learned parts that learn from real
signals (hypergradient, next-gradient prediction, a k-step unrolled meta-gradient checked against finite
differences), non-finite steps skipped without touching state, CMS levels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a second thread only waits


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    config = train.GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_embd=64, window_pattern="SL")
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def token_batch(generator, rows=4, T=32, vocab=96):
    return (torch.randint(0, vocab, (rows, T), generator=generator),
            torch.randint(0, vocab, (rows, T), generator=generator))


def train_step(model, optimizer, batch, step):
    """One step as train.py's loop takes it: the schedules first, then step(loss)."""
    loss = model(*batch)
    loss.backward()
    train.apply_schedules(optimizer, step / 20, step)
    optimizer.step(loss.detach())
    model.zero_grad(set_to_none=True)


def max_difference(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def learned_momentum(optimizer):
    """Each Muon matrix's learned momentum decay and Nesterov mix, b - (1 - b) * shift for its base momentum b."""
    base = torch.tensor([g["momentum"] for g in optimizer.param_groups if g["kind"] == "muon" for _ in g["params"]])
    return (base[:, None] - (1 - base[:, None]) * optimizer.shift.cpu()).unbind(1)


class Regression(nn.Module):
    """
    A two-layer net regressing a fixed teacher plus noise: two hidden matrices (Muon), biases (AdamW). Its good
    base_lr is known: alone (meta_lr 0), MuonAdamW reaches the noise floor (MSE 0.01) within 150 steps for
    base_lr 1e-2 to 3e-2, while 1e-5 leaves the loss where it starts (0.18) and 1.0 stalls at 0.65.
    """

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x, y):
        return (self.net(x) - y).pow(2).mean()


def regression_batches(seed, noise=0.1, rows=32):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    while True:
        x = torch.randn(rows, 8, generator=generator)
        with torch.no_grad():
            y = teacher(x) + noise * torch.randn(rows, 4, generator=generator)
        yield x, y


def fit_regression(steps, seed=0, noise=0.1, **options):
    torch.manual_seed(seed)
    model = Regression()
    optimizer = train.DeepNestedOptimizer(model, **options)
    batches = regression_batches(seed, noise)
    for _ in range(steps):
        loss = model(*next(batches))
        loss.backward()
        optimizer.step(loss.item())
        optimizer.zero_grad()
    return model, optimizer


# ---------------------------------------------------------------------------
# Roles and the equality with MuonAdamW before anything is learned
# ---------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.table = nn.Parameter(torch.randn(4, 16))  # 2-D, but no nn.Linear weight

    def forward(self, idx):
        h = self.embed(idx) + self.table[idx % 4]
        return self.head(self.norm(h + self.down(torch.relu(self.up(h)))))


def test_roles_come_from_module_types_not_names():
    model = Mixed()
    groups = train.role_param_groups(model, base_lr=1e-3, weight_decay=0.01)
    hidden = [p for g in groups if g["kind"] == "muon" for p in g["params"]]
    other = [p for g in groups if g["kind"] == "adamw" for p in g["params"]]
    assert {id(p) for p in hidden} == {id(model.up.weight), id(model.down.weight)}
    assert {id(p) for p in other} == {id(model.embed.weight), id(model.head.weight), id(model.table), id(model.up.bias),
                                      id(model.norm.weight), id(model.norm.bias)}
    optimizer = train.DeepNestedOptimizer(model)
    assert sorted(g["role"] for g in optimizer.param_groups) == [train.HIDDEN, train.HIDDEN, train.OTHER]


@pytest.mark.parametrize("options", [{}, {"mode": "explicit"}, {"use_cms_updates": True, "meta_lr": 0.0},
                                     {"controller_update_freq": 3, "meta_lr": 0.0}])
def test_update_equals_muonadamw_until_something_is_learned(options):
    reference, model = tiny_gpt(), tiny_gpt()
    muon = train.MuonAdamW(train.param_groups(reference))
    deepnested = train.DeepNestedOptimizer(model, groups=train.param_groups(model), **options)
    generator = torch.Generator().manual_seed(0)
    steps = 1 if options.get("meta_lr", 1.0) else 6  # with meta_lr 0 nothing is ever learned
    for step in range(steps):
        batch = token_batch(generator)
        train_step(reference, muon, batch, step)
        train_step(model, deepnested, batch, step)
        assert max_difference(reference, model) <= 1e-6
    assert max_difference(reference, tiny_gpt()) > 1e-3  # the steps did move the weights
    assert deepnested.get_lr_multipliers().tolist() == [1.0] * len(deepnested.param_groups)


def test_update_equals_muonadamw_on_an_arbitrary_module():
    torch.manual_seed(0)
    reference = Mixed()
    model = copy.deepcopy(reference)
    muon = train.MuonAdamW(train.role_param_groups(reference, base_lr=1e-3, weight_decay=0.01))
    deepnested = train.DeepNestedOptimizer(model, base_lr=1e-3, weight_decay=0.01)
    idx = torch.randint(0, 50, (8, 5))
    for m, optimizer in ((reference, muon), (model, deepnested)):
        m(idx).logsumexp(-1).mean().backward()
        optimizer.step()
    assert max_difference(reference, model) <= 1e-6
    assert max_difference(reference, Mixed()) > 1e-3


def test_build_optimizer_gives_deepnested_the_groups_and_lrs_of_muonadamw(monkeypatch):
    model = tiny_gpt()
    monkeypatch.setattr(train, "OPTIMIZER", "deepnested")
    optimizer = train.build_optimizer(model)
    assert isinstance(optimizer, train.DeepNestedOptimizer)
    expected = train.param_groups(model)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == [[id(p) for p in g["params"]] for g in expected]
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in expected]
    assert [g["role"] for g in optimizer.param_groups] == [train.HIDDEN if g.get("matrix") else train.OTHER
                                                           for g in expected]


# ---------------------------------------------------------------------------
# The learned parts learn from real signals
# ---------------------------------------------------------------------------

def test_multipliers_rise_when_the_learning_rate_is_far_too_small():
    _, optimizer = fit_regression(150, base_lr=1e-5)
    assert (optimizer.get_lr_multipliers() > 1.2).all(), optimizer.get_lr_multipliers()


def test_multipliers_fall_when_the_learning_rate_is_far_too_large():
    _, optimizer = fit_regression(150, base_lr=1.0)
    assert (optimizer.get_lr_multipliers() < 0.8).all(), optimizer.get_lr_multipliers()


def test_controller_inputs_are_free_of_the_gradient_scale():
    """Log-ratios, cosines and the schedule: features that do not see the scale of the loss, before any
    standardisation (which would hide raw norms behind their running statistics)."""
    records = []
    for scale in (1.0, 1e4):
        torch.manual_seed(0)
        model = Regression()
        optimizer = train.DeepNestedOptimizer(model, base_lr=1e-2, use_preprocessing=False)
        batches = regression_batches(0)
        features = []
        for _ in range(5):
            loss = model(*next(batches)) * scale
            loss.backward()
            optimizer.step(loss.item())
            optimizer.zero_grad()
            features.append(optimizer.record["x"].clone())
        records.append(torch.stack(features))
    assert torch.allclose(records[0], records[1], atol=1e-2)  # raw norms would differ by a factor 1e4
    assert records[0].abs().max() <= 10.0 and records[0][1:, :, :4].abs().min() > 0


def test_momentum_network_gets_gradients_and_its_prediction_loss_falls():
    torch.manual_seed(0)
    model = Regression()
    optimizer = train.DeepNestedOptimizer(model, base_lr=1e-4, meta_lr=3e-3)
    untrained = copy.deepcopy(optimizer.momentum_net)
    batches = regression_batches(0, noise=1.0)  # noisy gradients, slow weights: a longer average predicts better
    pairs = []
    for step in range(200):
        loss = model(*next(batches))
        loss.backward()
        if optimizer.record is not None:
            pairs.append((optimizer.record, optimizer._gather([p.grad for p in optimizer.tensors])))
        optimizer.step(loss.item())
        optimizer.zero_grad()
        if step == 1:  # one meta-step taken: the zero last layer has moved, so it had a gradient
            assert any((a - b).abs().max() > 0 for a, b in zip(untrained.parameters(),
                                                               optimizer.momentum_net.parameters()))

    def prediction_loss(net):
        optimizer.momentum_net = net
        with torch.no_grad():
            return sum(optimizer._prediction_loss(rec, g[:optimizer.n_hidden_samples]).item()
                       for rec, g in pairs[-100:]) / 100

    trained = optimizer.momentum_net
    assert prediction_loss(trained) < prediction_loss(untrained) - 3e-3
    assert learned_momentum(optimizer)[0].min() > train.MUON_MOMENTUM_END + 0.01


class LinearScore(nn.Module):
    """A loss linear in the weights, (W x + b) . y: its gradient on a batch is the same at any weights."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 4)

    def forward(self, x, y):
        return (self.net(x) * y).mean()


def explicit_setup(monkeypatch, k=2, model_class=Regression):
    monkeypatch.setattr(train, "DN_META_GRAD_CLIP", float("inf"))  # finite differences check unclipped meta-gradients
    torch.manual_seed(0)
    model = model_class()
    optimizer = train.DeepNestedOptimizer(model, base_lr=3e-2, mode="explicit", k_unroll=k, weight_decay=0.0)
    batches = regression_batches(0)
    for _ in range(5):
        loss = model(*next(batches))
        loss.backward()
        optimizer.step(loss.item())
        optimizer.zero_grad()
    return model, optimizer, [next(batches) for _ in range(k)], next(batches)


def test_explicit_meta_update_trains_both_networks_and_leaves_the_model_alone(monkeypatch):
    model, optimizer, train_batches, meta_batch = explicit_setup(monkeypatch)
    weights = copy.deepcopy(model.state_dict())
    nets = copy.deepcopy((optimizer.controller, optimizer.momentum_net))
    meta_loss = optimizer.meta_update(train_batches, meta_batch)
    assert torch.isfinite(meta_loss)
    for before, after in zip(nets, (optimizer.controller, optimizer.momentum_net)):
        assert (before.layers[-1].bias - after.layers[-1].bias).abs().max() > 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("k, model_class", [(1, Regression), (3, LinearScore)])
def test_explicit_meta_gradient_is_the_derivative_of_the_unrolled_loss(monkeypatch, k, model_class):
    """
    The meta-gradient of each last-layer bias equals a central finite difference of the meta loss, where holding
    the unrolled gradients constant (first-order) is exact: one unrolled step (its gradient is taken at the current
    weights, which the learned parts do not move), and three steps on a loss linear in the weights (each gradient
    is the same at any weights), through the momentum, the orthogonalisation, NorMuon and AdamW of every step.
    """
    model, optimizer, train_batches, meta_batch = explicit_setup(monkeypatch, k, model_class)
    for group in optimizer.param_groups:  # a shorter base momentum horizon: the learned decay moves the loss
        group["momentum"] = 0.5           # by more than float32 round-off
    biases = [optimizer.controller.layers[-1].bias, optimizer.momentum_net.layers[-1].bias]
    optimizer.meta_optimizer = torch.optim.SGD(biases, lr=1.0)  # one step of lr 1 moves a bias by minus its gradient
    before = [b.detach().clone() for b in biases]
    optimizer.meta_update(train_batches, meta_batch)
    gradients = [b0 - b.detach() for b0, b in zip(before, biases)]
    optimizer.meta_optimizer = torch.optim.SGD(biases, lr=0.0)
    eps = 1e-2
    for bias, b0, gradient in zip(biases, before, gradients):
        for j in range(len(b0)):
            losses = []
            for sign in (1, -1):
                with torch.no_grad():
                    bias.copy_(b0)
                    bias[j] += sign * eps
                losses.append(optimizer.meta_update(train_batches, meta_batch).item())
            with torch.no_grad():
                bias.copy_(b0)
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert abs(numeric) > 1e-5
            assert gradient[j].item() == pytest.approx(numeric, rel=0.1, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_meta_update_on_cuda_runs_through_flex_attention():
    model = tiny_gpt().cuda()
    model.windows = [16, 32]  # a banded layer: flex_attention, in meta-updates too
    optimizer = train.DeepNestedOptimizer(model, groups=train.param_groups(model), mode="explicit", k_unroll=2)
    generator = torch.Generator().manual_seed(0)
    batches = [tuple(t.cuda() for t in token_batch(generator)) for _ in range(3)]
    train_step(model, optimizer, batches[0], 0)
    assert torch.isfinite(optimizer.meta_update(batches[:2], batches[2]))


# ---------------------------------------------------------------------------
# Safety and CMS
# ---------------------------------------------------------------------------

def snapshot(model, optimizer):
    tensors = [t for t in model.state_dict().values()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors += [p for net in (optimizer.controller, optimizer.momentum_net) for p in net.parameters()]
    tensors += [v for state in optimizer.meta_optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors += [v for v in optimizer.record.values() if torch.is_tensor(v)]
    tensors += [optimizer.ema_grad, optimizer.ema_loss]
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_step_and_keeps_every_state(bad):
    model, generator = tiny_gpt(), torch.Generator().manual_seed(0)
    optimizer = train.DeepNestedOptimizer(model, groups=train.param_groups(model), use_cms_updates=True)
    for step in range(3):
        train_step(model, optimizer, token_batch(generator), step)
    before = snapshot(model, optimizer)
    loss = model(*token_batch(generator))
    loss.backward()
    model.blocks[0].attn.c_q.weight.grad[0, 0] = bad
    optimizer.step(loss.detach())
    model.zero_grad(set_to_none=True)
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, optimizer)))
    train_step(model, optimizer, token_batch(generator), 3)
    assert optimizer.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(model, optimizer)))


def test_multipliers_and_momentum_corrections_stay_bounded(monkeypatch):
    monkeypatch.setattr(train, "DN_MIN_LR_MULT", 0.5)
    monkeypatch.setattr(train, "DN_MAX_LR_MULT", 1.5)
    _, optimizer = fit_regression(100, base_lr=1e-6, meta_lr=0.1)
    multipliers = optimizer.get_lr_multipliers()
    assert (multipliers <= 1.5).all() and (multipliers >= 0.5).all() and (multipliers > 1.3).all()
    base = train.MUON_MOMENTUM_END
    for coefficient in learned_momentum(optimizer):
        horizon = 1 / (1 - coefficient)
        assert (horizon <= 2 / (1 - base) + 1e-3).all() and (horizon >= 0.5 / (1 - base) - 1e-3).all()


def test_cms_levels_are_updated_after_the_gradient_at_their_own_frequency(monkeypatch):
    monkeypatch.setattr(train, "DN_CMS_FREQUENCIES", (1, 2, 4))
    model, generator = tiny_gpt(), torch.Generator().manual_seed(0)
    optimizer = train.DeepNestedOptimizer(model, groups=train.param_groups(model), use_cms_updates=True, meta_lr=0.0)
    group = next(g for g in optimizer.param_groups if g["kind"] == "muon")
    state = optimizer.state[group["params"][0]]
    train_step(model, optimizer, token_batch(generator), 0)
    beta = train.get_muon_momentum(0)
    for key in ("cms_2", "cms_4"):  # from zero, after the first gradient: (1 - beta) * the new momentum
        torch.testing.assert_close(state[key], (1 - beta) * state["momentum_buffer"])
    level_2, level_4 = state["cms_2"].clone(), state["cms_4"].clone()
    for step in (1, 2, 3):
        train_step(model, optimizer, token_batch(generator), step)
        assert torch.equal(state["cms_2"], level_2) == (step == 1)
        assert torch.equal(state["cms_4"], level_4)
    train_step(model, optimizer, token_batch(generator), 4)
    assert not torch.equal(state["cms_4"], level_4)
    stats = optimizer.get_momentum_stats()
    assert stats["momentum_total_norm"] > 0 and len(stats["param_group_norms"]) == len(optimizer.param_groups)


def test_controller_update_freq_holds_the_multipliers_between_evaluations():
    torch.manual_seed(0)
    model = Regression()
    optimizer = train.DeepNestedOptimizer(model, base_lr=1e-5, meta_lr=1e-2, controller_update_freq=3)
    batches, seen = regression_batches(0), []
    for _ in range(9):
        loss = model(*next(batches))
        loss.backward()
        optimizer.step(loss.item())
        optimizer.zero_grad()
        seen.append(optimizer.get_lr_multipliers().tolist())
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and seen[6] == seen[7] == seen[8]
    assert seen[2] != seen[3] and seen[5] != seen[6]
