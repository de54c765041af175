"""
A stand-in for train.py in the loop's tests: the constants the backlog edits, train.py's progress
lines and summary block, a checkpoint the guard can re-evaluate, and no training, so a run takes
seconds. `python train.py` as the loop runs it; importing it (the guard does) runs nothing.

The "model" predicts the same distribution at every position: uniform over the vocabulary, with an
extra mass LAMBDA on BOS, which the evaluation never scores (0 bytes). Every scored token then costs
log2(V) + x bits, x = -log2(1 - LAMBDA), so val_bpb = (tokens per byte of val) * (log2(V) + x), with

    x = 0.1 * MUON_NS_STEPS + 0.01 * (seed - 42) - 0.025 * (MUON_BETA2 - 0.95)

exactly, through prepare.evaluate. With about 0.3 tokens per byte: the seeds 42 and 43 differ by
~0.003 (2 sigma ~0.004), NS-1 (3 steps) improves by ~0.06, MB-2 (beta2 0.99) by ~0.0003, and the
other constants leave val_bpb as it is. MATRIX_OPTIMIZER = "adamw" crashes with a traceback. The
run sleeps SLEEP seconds after its progress lines, cut short as soon as the file named by
FAKE_TRAIN_HOLD (when set) is gone; with SLEEP over a second it also forks a worker that sleeps
2 * SLEEP whatever happens, so only a killed process group ends it early.
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from prepare import VOCAB_SIZE, Tokenizer, evaluate

MUON_MOMENTUM_START = 0.85  # momentum at step 0
MUON_MOMENTUM_END = 0.95  # momentum after the ramp
MUON_MOMENTUM_RAMP_STEPS = 300  # steps of the linear ramp
MUON_NS_STEPS = 5  # Newton-Schulz iterations
MUON_BETA2 = 0.95  # NorMuon second-moment decay
MATRIX_OPTIMIZER = "muon"  # "muon" | "adamw"
MATRIX_LR = 0.04  # learning rate of the hidden matrices
OPTIMIZER = "muon"  # "muon" | "deepnested"
SLEEP = 0.2  # seconds the "training" takes
EVAL_BATCH_SIZE = 8  # rows per evaluation forward


@dataclass
class FakeConfig:
    vocab_size: int
    bos_mass: float


class Unigram(nn.Module):
    """The same logits at every position: causal by construction."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        p = torch.full((config.vocab_size,), (1.0 - config.bos_mass) / config.vocab_size, dtype=torch.float64)
        p[0] += config.bos_mass
        self.logits = nn.Parameter(p.log().float())

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1)


def load_checkpoint(path, device="cpu"):
    checkpoint = torch.load(path, map_location=device)
    model = Unigram(FakeConfig(**checkpoint["config"])).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def main():
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    run_dir = os.environ.get("AUTORESEARCH_RUN_DIR")
    hold = os.environ.get("FAKE_TRAIN_HOLD")
    t0 = time.time()
    if SLEEP > 1 and os.fork() == 0:  # a long run starts a worker, as a dataloader would; it outlives a killed parent
        time.sleep(2 * SLEEP)
        os._exit(0)
    for step in (1, 2):
        print(f"step {step:05d} ({50.0 * step:.1f}%) | loss: {4.2 - 0.1 * step:.6f} | lrm: 1.00 | dt: 100ms "
              f"| tok/sec: 10,000 | mfu: n/a | epoch: 1 | remaining: {2 - step}s", flush=True)
        if MATRIX_OPTIMIZER == "adamw":
            raise RuntimeError(f"the fake cannot train the hidden matrices with adamw at lr {MATRIX_LR}")
    deadline = time.monotonic() + SLEEP
    while time.monotonic() < deadline and (hold is None or os.path.exists(hold)):
        time.sleep(0.02)
    training_seconds = time.time() - t0

    x = 0.1 * MUON_NS_STEPS + 0.01 * (seed - 42) - 0.025 * (MUON_BETA2 - 0.95)
    model = Unigram(FakeConfig(vocab_size=VOCAB_SIZE, bos_mass=1.0 - 2.0 ** -x))
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        torch.save({"config": asdict(model.config), "state_dict": model.state_dict()},
                   os.path.join(run_dir, "checkpoint.pt"))
    metrics = evaluate(model, Tokenizer.from_directory(), EVAL_BATCH_SIZE, device="cpu")
    summary = {
        "val_bpb": f"{metrics['val_bpb']:.6f}", "val_loss": f"{metrics['val_loss']:.6f}",
        "val_accuracy": f"{metrics['val_accuracy']:.6f}", "val_perplexity": f"{metrics['val_perplexity']:.4f}",
        "training_seconds": f"{training_seconds:.1f}", "total_seconds": f"{time.time() - t0:.1f}",
        "peak_memory_mb": "512.0", "mfu_percent": "0.00", "tokens_per_second": "10000", "total_tokens_M": "0.02",
        "num_steps": "2", "num_params_M": f"{VOCAB_SIZE / 1e6:.4f}", "depth": "0", "optimizer": OPTIMIZER,
        "preset": os.environ.get("AUTORESEARCH_PRESET", "cpu"), "data_fingerprint": "fake",
    }
    # where and when it ran, for the slot tests: runs on one GPU must never overlap
    print(f"fake ran: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')} from {t0:.3f} to {time.time():.3f}")
    print("---")
    for key, value in summary.items():
        print(f"{key}: {value}")
    assert math.isfinite(metrics["val_bpb"])


if __name__ == "__main__":
    main()
