"""
What DeepNested costs over MuonAdamW (NorMuon) on the cpu-preset model: the median time of a full training
step (forward + backward over the preset's accumulation steps, then optimizer.step) and of optimizer.step
alone, on random token batches (no data needed); and the bytes of optimizer state: every tensor the
optimizer holds (optimizer.state, and for DeepNested its meta networks, their Adam state, the sample indices
and the stored samples), the model's own weights and gradients excluded.
Both optimizers step one and the same model in turns (ABBA order, one batch per round), so the forward and
backward work and its memory placement are identical, and the time ratio is the median of the per-round
ratios, so a slow spell of a shared machine hits both sides of a round alike.

Usage: python bench/optimizer_step.py [--rounds 8] [--warmup 1]
Prints `key: value` lines, ending with step_time_ratio_deepnested_over_muon and
state_memory_ratio_deepnested_over_muon.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("AUTORESEARCH_PRESET", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import train  # noqa: E402
from prepare import MAX_SEQ_LEN, VOCAB_SIZE  # noqa: E402


def state_bytes(optimizer, model):
    """Bytes of the distinct storages reachable from the optimizer, the model's own tensors excluded."""
    own = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
    excluded = {t.untyped_storage().data_ptr() for t in own}
    seen, visited = set(), set()

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in excluded:
                seen.add((storage.data_ptr(), storage.nbytes()))
        elif id(obj) in visited:
            return
        elif isinstance(obj, dict):
            visited.add(id(obj))
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            visited.add(id(obj))
            for value in obj:
                visit(value)
        elif isinstance(obj, (nn.Module, torch.optim.Optimizer)) or hasattr(obj, "__dict__"):
            visited.add(id(obj))
            if isinstance(obj, nn.Module):
                for tensor in (*obj.parameters(), *obj.buffers()):
                    visit(tensor)
            visit(vars(obj))

    visit(optimizer)
    return sum(nbytes for _, nbytes in seen)


def timed_step(model, optimizer, batches):
    t0 = time.perf_counter()
    for x, y in batches:
        loss = model(x, y)
        (loss / len(batches)).backward()
    t1 = time.perf_counter()
    optimizer.step(loss.detach())
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t2 - t0, t2 - t1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds, two steps of each optimizer each")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = train.build_model(VOCAB_SIZE, device="cpu")
    optimizers = {"muon": train.MuonAdamW(train.param_groups(model)),
                  "deepnested": train.DeepNestedOptimizer(model, param_groups=train.param_groups(model))}
    rows = train.DEVICE_BATCH_SIZE
    accumulation = train.TOTAL_BATCH_SIZE // (rows * MAX_SEQ_LEN)
    generator = torch.Generator().manual_seed(0)
    times = {name: ([], []) for name in optimizers}
    for i in range(args.warmup + args.rounds):
        batches = [(torch.randint(0, VOCAB_SIZE, (rows, MAX_SEQ_LEN), generator=generator),
                    torch.randint(0, VOCAB_SIZE, (rows, MAX_SEQ_LEN), generator=generator))
                   for _ in range(accumulation)]
        order = ["muon", "deepnested"] if i % 2 == 0 else ["deepnested", "muon"]
        for name in order + order[::-1]:
            full, step = timed_step(model, optimizers[name], batches)
            if i >= args.warmup:
                times[name][0].append(full)
                times[name][1].append(step)
    memory = {name: state_bytes(optimizer, model) for name, optimizer in optimizers.items()}
    print(f"preset: {train.PRESET}")
    print(f"params_M: {model.num_params() / 1e6:.2f}")
    print(f"tokens_per_step: {rows * MAX_SEQ_LEN * accumulation}")
    print(f"rounds: {args.rounds}")
    for name in optimizers:
        print(f"{name}_train_step_ms: {1e3 * statistics.median(times[name][0]):.1f}")
        print(f"{name}_optimizer_step_ms: {1e3 * statistics.median(times[name][1]):.1f}")
        print(f"{name}_state_bytes: {memory[name]}")
    for label, k in (("optimizer_step_time_ratio", 1), ("step_time_ratio", 0)):
        dn, muon = times["deepnested"][k], times["muon"][k]
        ratios = [(dn[j] + dn[j + 1]) / (muon[j] + muon[j + 1]) for j in range(0, len(dn), 2)]
        print(f"{label}_deepnested_over_muon: {statistics.median(ratios):.3f}")
    print(f"state_memory_ratio_deepnested_over_muon: {memory['deepnested'] / memory['muon']:.3f}")


if __name__ == "__main__":
    main()
