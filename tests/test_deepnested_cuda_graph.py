"""DeepNested's use_cuda_graph (the seed's): refused off CUDA with what to use instead; on CUDA, steps whose update
replays a captured CUDA graph end where eager steps end."""

from __future__ import annotations

import pytest
import torch

import train

STEPS, VOCAB, ROWS = 30, 128, 8


def cpu_preset_gpt():
    """The cpu preset's GPT (the tests run with AUTORESEARCH_PRESET=cpu), initialised on the CPU: fp32 weights."""
    torch.manual_seed(0)
    return train.build_model(VOCAB, device="cpu")


def test_cuda_graphs_are_refused_off_cuda_in_one_sentence_that_says_what_to_use():
    model = cpu_preset_gpt()
    with pytest.raises(ValueError) as refusal:
        train.DeepNestedOptimizer(model, groups=train.param_groups(model), use_cuda_graph=True)
    message = str(refusal.value)
    assert "use_cuda_graph=False" in message and message.endswith(".") and ". " not in message, message


def flat(parameters):
    return torch.cat([p.detach().float().reshape(-1) for p in parameters])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_thirty_steps_with_the_graph_end_where_thirty_eager_steps_end():
    """
    One init, one data stream, with and without use_cuda_graph (CMS on, so every state the update keeps is in play).
    The schedules move every step (the LR decays to 0 over the second half, momentum ramps, weight decay falls)
    and the learned multipliers move (meta_lr 1e-2), so a graph that had baked any of them in at its capture
    after step 2 would end far from the eager run (LR alone, with WARMDOWN_RATIO 0.5: 30 LR-steps against 23).
    Then a non-finite gradient: the graphed optimizer skips the step and leaves the weights alone.
    """
    start = flat(cpu_preset_gpt().parameters()).cuda()
    final = {}
    for use_cuda_graph in (False, True):
        model = cpu_preset_gpt().cuda()  # fp32 weights: fewer bf16 round-offs between the two runs
        torch.manual_seed(1)  # the meta networks' init
        optimizer = train.DeepNestedOptimizer(model, groups=train.param_groups(model), meta_lr=1e-2, use_cms_updates=True,
                                              use_cuda_graph=use_cuda_graph, cuda_graph_warmup_steps=3)
        generator = torch.Generator().manual_seed(0)
        for step in range(STEPS):
            x, y = (torch.randint(0, VOCAB, (ROWS, model.config.sequence_len), generator=generator).cuda()
                    for _ in range(2))
            loss = model(x, y)
            loss.backward()
            train.apply_schedules(optimizer, step / STEPS, step)
            optimizer.step(loss.detach())
            model.zero_grad(set_to_none=True)
        assert (optimizer.graph is not None) == use_cuda_graph and optimizer.skipped_steps == 0
        final[use_cuda_graph] = flat(model.parameters()), optimizer.get_lr_multipliers()
    (eager, eager_multipliers), (graphed, graphed_multipliers) = final[False], final[True]
    assert not torch.equal(eager_multipliers, torch.ones_like(eager_multipliers))
    torch.testing.assert_close(graphed_multipliers, eager_multipliers, atol=0.02, rtol=0)
    gap, moved = (graphed - eager).norm().item(), (eager - start).norm().item()
    assert gap < 0.02 * moved, (gap, moved)

    loss = model(x, y)
    loss.backward()
    model.lm_head.weight.grad[0, 0] = float("nan")
    optimizer.step(loss.detach())
    assert optimizer.skipped_steps == 1 and torch.equal(flat(model.parameters()), graphed)
