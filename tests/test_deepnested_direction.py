"""DeepNested's LR controller moves each role's multiplier the right way on its own: a role whose LR is far too
small is raised, one whose LR is far too large is lowered, while the other role stays at a good LR. Two problems:
a toy MLP classifier and a tiny GPT on second-order Markov data. "Too small", "good" and "too large" are measured,
not assumed: see each problem's docstring for its losses with the controller frozen (meta_lr 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a second thread only waits


CLASSIFIER_BASE_LR = 1e-2  # role_param_groups' base_lr for the classifier: good for both roles (measured)


class Classifier(nn.Module):
    """
    An MLP classifying Gaussian inputs by the argmax of a fixed random teacher. Hidden matrices: two nn.Linear.
    Other: their biases and the class embeddings that the logits are read from (zero at init, so the other role
    must learn for anything to be learned). tanh, not relu and a LayerNorm: a scale-invariant net shrugs off a
    too-large hidden LR (measured: x100 ended at loss 0.32 against 0.29), a saturating one does not.
    Measured with meta_lr 0, mean loss of steps 200-300: good LRs (CLASSIFIER_BASE_LR for both roles) 0.342;
    hidden x0.3 0.331, x3 0.456; other x0.3 0.390, x3 0.367; too small (x1e-3): hidden 0.926, other 2.035 (chance:
    log 8 = 2.08); too large (x30): hidden 0.893, other 0.735.
    """

    def __init__(self, n_in=16, width=64, n_classes=8):
        super().__init__()
        self.up, self.down = nn.Linear(n_in, width), nn.Linear(width, width // 2)
        self.classes = nn.Embedding(n_classes, width // 2)
        nn.init.zeros_(self.classes.weight)

    def forward(self, x, labels):
        h = torch.tanh(self.down(torch.tanh(self.up(x))))
        return F.cross_entropy(h @ self.classes.weight.T, labels)


def classifier_setup(seed):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    model = Classifier()
    generator = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            x = torch.randn(64, 16, generator=generator)
            with torch.no_grad():
                labels = teacher(x).argmax(-1)
            yield x, labels

    return model, train.role_param_groups(model, base_lr=CLASSIFIER_BASE_LR, weight_decay=0.0), batches()


def markov_gpt_setup(seed, vocab=32, T=16, rows=8):
    """
    train.GPT with train.param_groups, on a fixed random second-order Markov chain: the next token's logits are
    A[previous] + B[the one before]. Second order, so the blocks (hidden matrices) have work to do (attending to
    the token before); in a first-order chain the embedding and head alone hold the whole bigram table (measured
    on one, vocab 64, 500 steps: hidden LRs x1e-3 ended at loss 2.150 against 2.155). Measured with meta_lr 0,
    mean loss of steps 100-200: train.param_groups' LRs 1.956; hidden x0.3 1.975, x3 1.970; other x0.3 1.959,
    x3 2.077; too small (x1e-3): hidden 2.433, other 3.422 (chance: log 32 = 3.47); too large (x30): hidden 2.227,
    other 3.106.
    """
    generator = torch.Generator().manual_seed(seed)
    A, B = (2.0 * torch.randn(vocab, vocab, generator=generator) for _ in range(2))
    torch.manual_seed(seed)
    config = train.GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()

    def batches():
        while True:
            tokens = [torch.randint(0, vocab, (rows,), generator=generator) for _ in range(2)]
            for _ in range(T - 1):
                probabilities = torch.softmax(A[tokens[-1]] + B[tokens[-2]], -1)
                tokens.append(torch.multinomial(probabilities, 1, generator=generator).squeeze(1))
            sequence = torch.stack(tokens, 1)
            yield sequence[:, :-1].contiguous(), sequence[:, 1:].contiguous()

    return model, train.param_groups(model), batches()


SETUPS = {"classifier": classifier_setup, "markov_gpt": markov_gpt_setup}


def fit(problem, scales, steps, seed=0, **options):
    """
    Train `problem` with DeepNested, each role's LRs scaled by scales[role]; returns the mean training loss of the
    last 100 steps (each batch is fresh, so it estimates the expected loss) and the final multiplier of each role.
    """
    model, groups, batches = SETUPS[problem](seed)
    for g in groups:
        g["lr"] *= scales[train.HIDDEN if g["kind"] == "muon" or g.get("matrix") else train.OTHER]
    optimizer = train.DeepNestedOptimizer(model, groups=groups, **options)
    losses = []
    for _ in range(steps):
        loss = model(*next(batches))
        loss.backward()
        optimizer.step(loss.detach())
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    by_role = {g["role"]: m for g, m in zip(optimizer.param_groups, optimizer.get_lr_multipliers().tolist())}
    return sum(losses[-100:]) / len(losses[-100:]), by_role


# Measured on seeds 0 and 1: every case has moved clearly by then (the issue allows 1000). At 300 classifier steps a
# too-large hidden LR had only reached 0.83 on one CPU and 0.66 on another (float order): too close to the bar.
STEPS = {"classifier": 600, "markov_gpt": 200}
TOO_SMALL, TOO_LARGE = 1e-3, 30.0                # one role's LRs times this; the other role's stay good
# A too-large hidden LR in the Markov GPT drives both roles' multipliers down together (seeds 0/1 at 200 steps:
# hidden 0.18/0.20, other 0.17/0.22): the controller lowers the right role, but cannot tell which role was mis-set,
# so their order is a coin flip and only the direction is asserted.
BOTH_FALL = {("markov_gpt", train.HIDDEN, TOO_LARGE)}
ROLE_NAMES = {train.HIDDEN: "hidden", train.OTHER: "other"}
CASES = [(problem, role, scale) for problem in SETUPS for role in ROLE_NAMES for scale in (TOO_SMALL, TOO_LARGE)]
CASE_IDS = [f"{problem}-{ROLE_NAMES[role]}-too_{'small' if scale < 1 else 'large'}" for problem, role, scale in CASES]


@pytest.mark.parametrize("problem, role, scale", CASES, ids=CASE_IDS)
def test_a_mis_set_roles_multiplier_moves_toward_a_good_lr(problem, role, scale):
    """
    Too small: the role's multiplier ends above 1.2; too large: below 0.8. The other role's LR is good, but its
    multiplier is not held at 1: the one-step hypergradient is greedy, so it asks for more while the loss falls
    fast and for less once gradient noise dominates (it ends between 0.19 and 1.91, see docs/readme-dir.md). What
    holds is the order: the mis-set role ends further in its own direction than the good one.
    """
    _, multipliers = fit(problem, {train.HIDDEN: 1.0, train.OTHER: 1.0, role: scale}, STEPS[problem])
    moved, good = multipliers[role], multipliers[1 - role]
    if scale < 1:
        assert moved > 1.2 and moved > good, multipliers
    else:
        assert moved < 0.8 and (moved < good or (problem, role, scale) in BOTH_FALL), multipliers


@pytest.mark.slow
@pytest.mark.parametrize("problem", SETUPS)
def test_the_cases_lrs_really_are_too_small_and_too_large(problem):
    """The premise of the cases above, with the controller frozen (meta_lr 0): each mis-set LR ends clearly worse
    than the good LRs (the losses are in the setups' docstrings)."""
    good, _ = fit(problem, {train.HIDDEN: 1.0, train.OTHER: 1.0}, STEPS[problem], meta_lr=0.0)
    for role in ROLE_NAMES:
        for scale in (TOO_SMALL, TOO_LARGE):
            loss, multipliers = fit(problem, {train.HIDDEN: 1.0, train.OTHER: 1.0, role: scale}, STEPS[problem],
                                    meta_lr=0.0)
            assert multipliers == {train.HIDDEN: 1.0, train.OTHER: 1.0}
            assert loss > good + 0.1, (ROLE_NAMES[role], scale, loss, good)
