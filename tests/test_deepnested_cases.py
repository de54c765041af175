"""DeepNested in every case: a silent tensor (zero gradient) leaves the meta-signal of the others intact and no
meta-step is dropped; every OPTIMIZER x MATRIX_OPTIMIZER pair trains; the seed's constructor arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a second thread only waits


class Regression(nn.Module):
    """A two-layer regression net; with `unused`, a third nn.Linear that never sees data (its gradient is zero)."""

    def __init__(self, unused=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.unused = nn.Linear(16, 16) if unused else None

    def forward(self, x, y):
        loss = (self.net(x) - y).pow(2).mean()
        return loss if self.unused is None else loss + 0.0 * self.unused.weight.sum()


def fit(model, steps, **options):
    optimizer = train.DeepNestedOptimizer(model, **options)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    for _ in range(steps):
        x = torch.randn(32, 8, generator=generator)
        with torch.no_grad():
            y = teacher(x) + 0.1 * torch.randn(32, 4, generator=generator)
        loss = model(x, y)
        loss.backward()
        optimizer.step(loss.item())
        optimizer.zero_grad()
    return optimizer


def test_an_unused_linear_leaves_the_multipliers_moving_as_without_it():
    torch.manual_seed(0)
    alone = fit(Regression(), 150, base_lr=1e-5)
    torch.manual_seed(0)
    with_unused = fit(Regression(unused=True), 150, base_lr=1e-5)
    assert with_unused.dropped_meta_steps == 0 and alone.dropped_meta_steps == 0
    moved, reference = with_unused.get_lr_multipliers(), alone.get_lr_multipliers()
    assert (reference > 1.2).all(), reference
    by_role = {g["role"]: m for g, m in zip(with_unused.param_groups, moved.tolist())}
    assert by_role[train.HIDDEN] == pytest.approx(reference[-1].item(), abs=0.15)
    assert by_role[train.OTHER] == pytest.approx(reference[0].item(), abs=0.15)


def tiny_gpt():
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def test_the_gpts_first_meta_step_applies():
    """At step 0 the zero output projections make c_q/c_k/c_v/c_fc gradients exactly zero."""
    model = tiny_gpt()
    optimizer = train.DeepNestedOptimizer(model, groups=train.param_groups(model), mode="simple")
    generator = torch.Generator().manual_seed(0)
    controller = optimizer.controller.layers[-1].bias.detach().clone()
    for step in range(2):
        x, y = (torch.randint(0, 64, (2, 16), generator=generator) for _ in range(2))
        model(x, y).backward()
        if step == 0:
            assert model.blocks[0].attn.c_q.weight.grad.abs().max() == 0
        optimizer.step(1.0)
        model.zero_grad(set_to_none=True)
    assert optimizer.dropped_meta_steps == 0
    assert (optimizer.controller.layers[-1].bias - controller).abs().max() > 0


@pytest.mark.parametrize("optimizer_name", ["muon", "deepnested"])
@pytest.mark.parametrize("matrix_optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("mode", ["simple", "explicit"])
def test_every_optimizer_pair_trains(monkeypatch, optimizer_name, matrix_optimizer, mode):
    if optimizer_name == "muon" and mode == "explicit":
        pytest.skip("the mode is DeepNested's")
    monkeypatch.setattr(train, "OPTIMIZER", optimizer_name)
    monkeypatch.setattr(train, "MATRIX_OPTIMIZER", matrix_optimizer)
    model = tiny_gpt()
    optimizer = train.build_optimizer(model)
    if optimizer_name == "deepnested":
        optimizer.mode = mode
    generator = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, 64, (2, 16), generator=generator) for _ in range(2)) for _ in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches[:3]:
        loss = model(x, y)
        loss.backward()
        optimizer.step(loss.detach())
        model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    if optimizer_name == "deepnested" and mode == "explicit":
        assert torch.isfinite(optimizer.meta_update(batches[:2], batches[3]))
    if optimizer_name == "deepnested":
        assert optimizer.dropped_meta_steps == 0 and optimizer.skipped_steps == 0
        assert len(optimizer.get_lr_multipliers()) == len(optimizer.param_groups)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.dim() == 2)


def test_implicit_mode_is_refused_with_what_to_use_instead():
    with pytest.raises(ValueError, match="mode='explicit'"):
        train.DeepNestedOptimizer(Regression(), mode="implicit")


def test_the_seeds_arguments_are_accepted_and_defaults_come_from_the_dn_constants():
    """Every argument of the seed's constructor, each with its meaning: base_lr the model's LR (Muon's scaled to
    AdamW's update size), weight_decay the hidden matrices' decay."""
    optimizer = train.DeepNestedOptimizer(Regression(), base_lr=3e-4, meta_lr=1e-4, momentum_hidden_dim=64,
                            momentum_num_layers=4, controller_hidden_dim=32, controller_num_layers=5,
                            mode="explicit", use_cms_updates=False, use_preprocessing=True,
                            weight_decay=0.01, max_grad_norm=1.0, meta_update_freq=50, k_unroll=5,
                            use_compile=False, controller_update_freq=1, use_cuda_graph=False,
                            cuda_graph_warmup_steps=3)
    assert len(optimizer.controller.layers) == 5 and len(optimizer.momentum_net.layers) == 4
    assert optimizer.k_unroll == 5 and optimizer.max_grad_norm == 1.0
    assert optimizer.meta_optimizer.param_groups[0]["lr"] == 1e-4
    adamw, muon = ([g for g in optimizer.param_groups if g["kind"] == kind] for kind in ("adamw", "muon"))
    assert adamw[0]["lr"] == 3e-4 and adamw[0]["weight_decay"] == 0.0
    assert muon and all(g["weight_decay"] == 0.01 for g in muon)
    default = train.DeepNestedOptimizer(Regression())
    assert [g for g in default.param_groups if g["kind"] == "adamw"][0]["lr"] == train.DN_BASE_LR
    assert all(g["weight_decay"] == train.WEIGHT_DECAY for g in default.param_groups if g["kind"] == "muon")
    assert len(default.controller.layers) == train.DN_CONTROLLER_NUM_LAYERS
    assert default.meta_optimizer.param_groups[0]["lr"] == train.DN_META_LR
    assert (default.mode, default.k_unroll, default.max_grad_norm) == (train.DN_MODE, train.DN_K_UNROLL,
                                                                       train.DN_MAX_GRAD_NORM)


def test_without_groups_it_takes_the_groups_of_train_pys_gpt():
    model = tiny_gpt()
    taken, expected = train.DeepNestedOptimizer(model).param_groups, train.param_groups(model)
    assert [[id(p) for p in g["params"]] for g in taken] == [[id(p) for p in g["params"]] for g in expected]
    by_role = train.DeepNestedOptimizer(model, base_lr=1e-3).param_groups  # the seed's call: one LR, groups by role
    assert by_role[0]["kind"] == "adamw" and by_role[0]["lr"] == 1e-3 and len(by_role) < len(expected)


def test_update_meta_components_runs_one_meta_step_by_hand():
    torch.manual_seed(0)
    model = Regression()
    optimizer = fit(model, 2, base_lr=1e-3)
    bias = optimizer.controller.layers[-1].bias.detach().clone()
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    loss = model(x, y)
    loss.backward()
    optimizer._update_meta_components(loss.item())
    assert (optimizer.controller.layers[-1].bias - bias).abs().max() > 0 and not optimizer.pending
    moved = optimizer.controller.layers[-1].bias.detach().clone()
    optimizer._update_meta_components(loss.item())  # nothing left to learn from until the next refresh
    assert torch.equal(optimizer.controller.layers[-1].bias, moved)
    with pytest.raises(ValueError, match="meta_update"):
        train.DeepNestedOptimizer(Regression(), mode="explicit")._update_meta_components(1.0)
