"""
A stand-in for train.py that learns in seconds: a unigram model, the same logits at every position,
fitted by counting tokens. UNIGRAM_DATA says what it counts:

    "none"   nothing: uniform over the vocabulary (the baseline)
    "train"  the training stream, through make_dataloader: an honest gain, on val and on test alike
    "val"    the validation rows, read by handing prepare.evaluate a model that records its inputs:
             training on val by a route no loader refusal and no static check sees; its gain on
             val is larger than on test, which is what the loop's val-vs-test rule is for

The seed puts a little of the probability mass on BOS (never scored), so baselines differ a little.
`python train.py` as the loop runs it; importing it (the guard does) runs nothing.
"""

import os
import time
from dataclasses import asdict, dataclass
from itertools import islice

import torch
import torch.nn as nn

from prepare import EVAL_TOKENS, MAX_SEQ_LEN, VOCAB_SIZE, Tokenizer, evaluate, make_dataloader

UNIGRAM_DATA = "none"  # "none" | "train" | "val": what the unigram counts
EVAL_BATCH_SIZE = 8  # rows per evaluation forward


@dataclass
class UnigramConfig:
    vocab_size: int


class Unigram(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.logits = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1)


def load_checkpoint(path, device="cpu"):
    checkpoint = torch.load(path, map_location=device)
    model = Unigram(UnigramConfig(**checkpoint["config"])).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def score(model, tokenizer):
    return evaluate(model, tokenizer, EVAL_BATCH_SIZE, device="cpu")


def rows_to_count(tokenizer):
    """The evaluation's number of tokens, from the split UNIGRAM_DATA names."""
    if UNIGRAM_DATA == "val":
        seen = []
        score(lambda idx: seen.append(idx) or torch.zeros(*idx.shape, VOCAB_SIZE), tokenizer)
        return seen
    loader = make_dataloader(tokenizer, EVAL_BATCH_SIZE, MAX_SEQ_LEN, "train", seed=0, device="cpu")
    return [x for x, _, _ in islice(loader, max(1, EVAL_TOKENS // (EVAL_BATCH_SIZE * MAX_SEQ_LEN)))]


def main():
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    run_dir = os.environ.get("AUTORESEARCH_RUN_DIR")
    t0 = time.time()
    tokenizer = Tokenizer.from_directory()
    counts = torch.ones(VOCAB_SIZE, dtype=torch.float64)
    if UNIGRAM_DATA != "none":
        counts += torch.bincount(torch.cat([x.reshape(-1) for x in rows_to_count(tokenizer)]), minlength=VOCAB_SIZE)
    counts[tokenizer.get_bos_token_id()] += 0.02 * (seed - 41) * counts.sum()
    for step in (1, 2):
        print(f"step {step:05d} ({50.0 * step:.1f}%) | loss: {4.2 - 0.1 * step:.6f} | lrm: 1.00 | dt: 100ms "
              f"| tok/sec: 10,000 | mfu: n/a | epoch: 1 | remaining: {2 - step}s", flush=True)
    model = Unigram(UnigramConfig(VOCAB_SIZE))
    with torch.no_grad():
        model.logits.copy_(counts.log().float())
    training_seconds = time.time() - t0
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        torch.save({"config": asdict(model.config), "state_dict": model.state_dict()},
                   os.path.join(run_dir, "checkpoint.pt"))
    metrics = score(model, tokenizer)
    summary = {
        "val_bpb": f"{metrics['val_bpb']:.6f}", "val_loss": f"{metrics['val_loss']:.6f}",
        "val_accuracy": f"{metrics['val_accuracy']:.6f}", "val_perplexity": f"{metrics['val_perplexity']:.4f}",
        "training_seconds": f"{training_seconds:.1f}", "total_seconds": f"{time.time() - t0:.1f}",
        "peak_memory_mb": "512.0", "mfu_percent": "0.00", "tokens_per_second": "10000", "total_tokens_M": "0.02",
        "num_steps": "2", "num_params_M": f"{VOCAB_SIZE / 1e6:.4f}", "depth": "0", "optimizer": "unigram",
        "preset": os.environ.get("AUTORESEARCH_PRESET", "cpu"), "data_fingerprint": "fake",
    }
    print("---")
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
