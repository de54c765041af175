"""
The reference a tuned train.py must beat on the cpu preset: a plain ~60-line GPT + AdamW loop
(learned positions, LayerNorm, GELU, tied embeddings; AdamW whose LR decays linearly to 0 over the last
half of the budget, as train.py's does), trained for the same budget on the same data and scored by the
same prepare.evaluate. Prints `val_bpb: ...` and friends.

Usage: AUTORESEARCH_PRESET=cpu python -m bench.plain_gpt [--lr 3e-3] [--seconds 60] [--seed 42]
"""

import argparse
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, evaluate, make_dataloader


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class PlainGPT(nn.Module):
    def __init__(self, vocab, d=128, layers=4, heads=4, seq=MAX_SEQ_LEN):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        return self.ln(self.blocks(x)) @ self.tok.weight.T  # tied head


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW LR")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=TIME_BUDGET)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_directory()
    model = PlainGPT(tokenizer.get_vocab_size())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    loader = make_dataloader(tokenizer, args.batch, MAX_SEQ_LEN, "train", device="cpu")  # prepare's fixed order, as train.py
    start, step = time.time(), 0
    while (progress := (time.time() - start) / args.seconds) < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, 2 * (1.0 - progress))  # flat, then linear to 0 over the last half
        x, y, _ = next(loader)
        loss = F.cross_entropy(model(x).view(-1, tokenizer.get_vocab_size()), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if not math.isfinite(loss.item()):
            sys.exit("plain_gpt: loss is NaN")
    model.eval()
    metrics = evaluate(model, tokenizer, 16, device="cpu")
    print("---")
    print(f"val_bpb: {metrics['val_bpb']:.6f}")
    print(f"val_loss: {metrics['val_loss']:.6f}")
    print(f"num_steps: {step}")
    print(f"tokens_per_second: {step * args.batch * MAX_SEQ_LEN / args.seconds:.0f}")
    print(f"num_params_M: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}")


if __name__ == "__main__":
    main()
