"""
What DeepNested costs over MuonAdamW (NorMuon) on the cpu-preset model: the median time of a full training
step (forward + backward over the preset's accumulation steps, then optimizer.step) and of optimizer.step
alone, on random token batches (no data needed); and the bytes of optimizer state: every tensor the
optimizer holds (optimizer.state, and for DeepNested its meta networks, their Adam state, the sample indices
and the stored samples), the model's own weights and gradients excluded.
Both optimizers step one and the same model in turns (ABBA order, one batch per round), so the forward and
backward work and its memory placement are identical, and the time ratio is the median of the per-round
ratios, so a slow spell of a shared machine hits both sides of a round alike.

Then explicit mode's meta-update against a training step, for the cpu preset's shape and the gpu preset's shape
at reduced width (depth, heads and the ratio of DN_META_ROWS to DEVICE_BATCH_SIZE kept; width, sequence and rows
scaled down to fit a CPU): meta_update_time_ratio is the median meta-update time over the median training step
time; meta_update_memory_ratio is the peak resident memory a meta-update adds over what a training step adds
(the kernel's peak counter reset before each, Linux), the model and optimizer state already held: whether the
meta-update fits where training fits. meta_update_amortised_overhead spreads it over DN_META_UPDATE_FREQ steps.

Usage: python -m bench.optimizer_step [--rounds 8] [--warmup 1] [--meta-repeats 3] [--gpu-width 128]
Prints `key: value` lines; exits non-zero if any measurement fails.
"""

import argparse
import ctypes
import os
import statistics
import sys
import time

os.environ.setdefault("AUTORESEARCH_PRESET", "cpu")

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


def shape_setup(shape, gpu_width):
    """Model config, training rows, sequence length, accumulation steps and meta rows of a preset's shape."""
    if shape == "cpu":
        config = train.build_model(VOCAB_SIZE, device="cpu").config
        rows = train.DEVICE_BATCH_SIZE
        return config, rows, MAX_SEQ_LEN, train.TOTAL_BATCH_SIZE // (rows * MAX_SEQ_LEN), train.DN_META_ROWS
    # gpu preset: depth 8, 4 heads, SSSL windows, 128 rows per micro-batch and 16 meta rows; here width gpu_width,
    # sequence 512 and rows / 16 (8 training rows, 1 meta row): the same ratio of meta rows to training rows
    config = train.GPTConfig(sequence_len=512, vocab_size=VOCAB_SIZE, n_layer=8, n_head=4, n_embd=gpu_width,
                             window_pattern="SSSL")
    return config, 8, 512, 1, 1


def rss_kb(field):
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def phase_peak_kb(run):
    """Peak resident memory that run() adds above what the process holds before it: freed heap returned first
    (malloc_trim), then the kernel's peak counter reset (clear_refs 5)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = rss_kb("VmRSS")
    run()
    return max(rss_kb("VmHWM") - before, 1)


def meta_update_ratios(shape, gpu_width, repeats):
    """Explicit mode's meta-update against a training step of the same model: median times and peak memory."""
    torch.manual_seed(0)
    config, rows, seq, accumulation, meta_rows = shape_setup(shape, gpu_width)
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = train.DeepNestedOptimizer(model, groups=train.param_groups(model), mode="explicit")
    generator = torch.Generator().manual_seed(0)

    def batch(n):
        return (torch.randint(0, VOCAB_SIZE, (n, seq), generator=generator),
                torch.randint(0, VOCAB_SIZE, (n, seq), generator=generator))

    step_times, meta_times, recent = [], [], []

    def training_steps():
        for _ in range(max(repeats, optimizer.k_unroll)):
            batches = [batch(rows) for _ in range(accumulation)]
            step_times.append(timed_step(model, optimizer, batches)[0])
            recent.append(tuple(t[:meta_rows] for t in batches[-1]))

    def meta_updates():
        for _ in range(repeats):
            t0 = time.perf_counter()
            meta_loss = optimizer.meta_update(recent[-optimizer.k_unroll:], batch(meta_rows))
            meta_times.append(time.perf_counter() - t0)
            if meta_loss is None or not torch.isfinite(meta_loss):
                sys.exit(f"the {shape} meta-update failed: meta loss {meta_loss}")

    training_steps()  # optimizer state allocated: the next phases measure only what a step or an update adds
    step_peak = phase_peak_kb(training_steps)
    meta_peak = phase_peak_kb(meta_updates)
    step_s, meta_s = statistics.median(step_times), statistics.median(meta_times)
    print(f"{shape}_meta_update_ms: {1e3 * meta_s:.1f}")
    print(f"{shape}_meta_train_step_ms: {1e3 * step_s:.1f}")
    print(f"{shape}_meta_update_time_ratio: {meta_s / step_s:.3f}")
    print(f"{shape}_meta_update_memory_ratio: {meta_peak / step_peak:.3f}")
    print(f"{shape}_meta_update_amortised_overhead: {meta_s / step_s / train.DN_META_UPDATE_FREQ:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds, two steps of each optimizer each")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--meta-repeats", type=int, default=3, help="meta-updates timed per shape")
    parser.add_argument("--gpu-width", type=int, default=128, help="model width standing in for the gpu shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = train.build_model(VOCAB_SIZE, device="cpu")
    optimizers = {"muon": train.MuonAdamW(train.param_groups(model)),
                  "deepnested": train.DeepNestedOptimizer(model, groups=train.param_groups(model))}
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
    for shape in ("cpu", "gpu"):
        meta_update_ratios(shape, args.gpu_width, args.meta_repeats)


if __name__ == "__main__":
    main()
