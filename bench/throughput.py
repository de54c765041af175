"""
Throughput of train.py's training step against the bare forward + backward + AdamW of the same
model, measured interleaved in one process (medians), and Muon's share of a step.

Usage: AUTORESEARCH_PRESET=cpu python -m bench.throughput [--steps 5] [--rounds 5]
Needs prepared data (python prepare.py). Prints `key: value` lines; goals:
train_over_bare_ratio >= 0.95, muon_step_fraction_of_fwd_bwd <= 0.10.
"""

import argparse
import math
import statistics
import sys
import time

import torch

import train
from prepare import MAX_SEQ_LEN, PRESET, Tokenizer, make_dataloader


def sync():
    if train.DEVICE.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.from_directory()
    accum = train.TOTAL_BATCH_SIZE // (train.DEVICE_BATCH_SIZE * MAX_SEQ_LEN)
    torch.manual_seed(0)
    model_train, model_bare = (train.build_model(tokenizer.get_vocab_size()) for _ in range(2))
    optimizer = train.build_optimizer(model_train)
    bare_optimizer = torch.optim.AdamW(model_bare.parameters(), lr=1e-3, betas=train.ADAM_BETAS, eps=1e-10)
    loader = make_dataloader(tokenizer, train.DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", seed=0, device=train.DEVICE)
    fixed = [next(loader)[:2] for _ in range(accum)]

    def train_step(step):
        """The body of train.py's loop: accumulation from the loader, schedules, step, loss read-back."""
        for _ in range(accum):
            x, y, _ = next(loader)
            with train.autocast():
                loss = model_train(x, y)
            train_loss = loss.detach()
            (loss / accum).backward()
        train.apply_schedules(optimizer, 0.5, step)
        optimizer.step(train_loss)
        model_train.zero_grad(set_to_none=True)
        return train_loss.item()

    def bare_step():
        for x, y in fixed:
            with train.autocast():
                loss = model_bare(x, y)
            (loss / accum).backward()
        bare_optimizer.step()
        model_bare.zero_grad(set_to_none=True)
        return loss.item()

    def fwd_bwd_then_muon():
        for x, y in fixed:
            with train.autocast():
                loss = model_train(x, y)
            (loss / accum).backward()
        sync()
        t0 = time.perf_counter()
        optimizer.step(loss.detach())
        sync()
        t1 = time.perf_counter()
        model_train.zero_grad(set_to_none=True)
        return t1 - t0

    def timed(fn, *a):
        sync()
        t0 = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t0

    losses = [train_step(0), bare_step()]  # warm-up (compilation on CUDA)
    if not all(math.isfinite(loss) for loss in losses):
        return f"throughput: the warm-up steps gave losses {losses}; the numbers would time a broken model."
    train_times, bare_times, fwd_bwd_times, muon_times = [], [], [], []
    for r in range(args.rounds):
        train_times += [timed(train_step, r * args.steps + i) for i in range(args.steps)]
        bare_times += [timed(bare_step) for _ in range(args.steps)]
        for _ in range(args.steps):
            t0 = time.perf_counter()
            muon_times.append(fwd_bwd_then_muon())
            fwd_bwd_times.append(time.perf_counter() - t0 - muon_times[-1])
    tokens = train.TOTAL_BATCH_SIZE
    train_tps = tokens / statistics.median(train_times)
    bare_tps = tokens / statistics.median(bare_times)
    print(f"preset: {PRESET}")
    print(f"device: {train.DEVICE.type}")
    print(f"tokens_per_step: {tokens}")
    print(f"train_step_tokens_per_second: {train_tps:.0f}")
    print(f"bare_adamw_tokens_per_second: {bare_tps:.0f}")
    print(f"muon_step_ms: {1000 * statistics.median(muon_times):.1f}")
    print(f"fwd_bwd_ms: {1000 * statistics.median(fwd_bwd_times):.1f}")
    print(f"muon_step_fraction_of_fwd_bwd: {statistics.median(muon_times) / statistics.median(fwd_bwd_times):.3f}")
    print(f"train_over_bare_ratio: {train_tps / bare_tps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
