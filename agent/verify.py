"""
Re-evaluate a run's checkpoint in a fresh process with prepare.py's evaluation, on val (which the
search selects on) and on test (which it never sees), then probe the model for causality. The guard runs it with the experiment's worktree as the working directory:

    python agent/verify.py CHECKPOINT [--batch N] [--sequences 4] [--positions 3]

It prints one JSON line: the re-evaluated val_* and test_* metrics with the seconds each took, the causality probe's largest deviation, and any
attribute of prepare, math, builtins, torch, torch.nn.functional, torch.Tensor or nn.Module that
importing train.py replaced (a way to fake the metric for the run and this re-evaluation alike).
"""

import argparse
import builtins
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
import prepare  # noqa: E402  the worktree's prepare.py, whose hash the guard pinned


WATCHED = {"prepare": prepare, "math": math, "builtins": builtins, "torch": torch, "F": F, "torch.nn": torch.nn,
           "torch.Tensor": torch.Tensor, "torch.nn.Module": torch.nn.Module}


def snapshot():
    """Every attribute of the modules and classes the metric runs through, before train.py's code runs."""
    return {label: dict(vars(owner)) for label, owner in WATCHED.items()}


def tampered_names(before):
    """Attributes that existed before and are now another object or gone (new ones are lazy imports)."""
    gone = object()
    return sorted(f"{label}.{name}" for label, owner in WATCHED.items()
                  for name, value in before[label].items() if vars(owner).get(name, gone) is not value)


def probe_causality(model, tokens, positions, generator):
    """Largest change of the logits at positions <= t when every token after t is replaced."""
    worst, where = 0.0, None
    vocab = model.config.vocab_size
    with torch.no_grad():
        base = model(tokens).float()
        T = tokens.size(1)
        for t in positions:
            changed = tokens.clone()
            changed[:, t + 1:] = torch.randint(0, vocab, (tokens.size(0), T - t - 1), generator=generator).to(tokens.device)
            deviation = (model(changed).float()[:, :t + 1] - base[:, :t + 1]).abs().max().item()
            if deviation > worst or where is None:
                worst, where = deviation, t
    return worst, where


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=None, help="evaluation rows per forward (default: train.py's)")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--positions", type=int, default=3)
    args = parser.parse_args()
    before = snapshot()
    evaluate, packed_rows = prepare.evaluate, prepare._packed_rows
    import train  # the experiment's model code; its training loop does not run on import

    tampered = tampered_names(before)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = train.load_checkpoint(args.checkpoint, device)
    model.eval()
    tokenizer = prepare.Tokenizer.from_directory()
    batch = args.batch or getattr(train, "EVAL_BATCH_SIZE", 4)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    metrics = {}
    for split in prepare.EVALUATION_SPLITS:
        t0 = time.perf_counter()
        with autocast:
            metrics.update(evaluate(model, tokenizer, batch, device=device, split=split))
        metrics[f"{split}_seconds"] = time.perf_counter() - t0

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(1234)
    loader = packed_rows(tokenizer, args.sequences, prepare.MAX_SEQ_LEN, "val", None, device)
    tokens, _, _ = next(loader)
    rng = random.Random(1234)
    positions = sorted(rng.sample(range(0, prepare.MAX_SEQ_LEN - 1), args.positions))
    deviation, position = probe_causality(model, tokens, positions, generator)
    print(json.dumps(dict(metrics, probe_max_deviation=deviation, probe_position=position,
                          probe_positions=positions, probe_sequences=args.sequences, tampered=tampered,
                          device=device.type)))


if __name__ == "__main__":
    main()
