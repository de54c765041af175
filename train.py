"""
Pretraining script: a GPT, its optimizers (Muon/NorMuon + AdamW, and DeepNested: the same with learned
LR multipliers and momentum) and a fixed-time training loop, in one file. This is the only file an
experiment edits; prepare.py holds the data and the metric.

Usage: python train.py            (after python prepare.py)
Environment, set by the loop or by hand: AUTORESEARCH_PRESET, AUTORESEARCH_TIME_BUDGET,
AUTORESEARCH_SEED, AUTORESEARCH_RUN_DIR (where the checkpoint goes), AUTORESEARCH_CACHE.
It ends by printing `---` and a `key: value` summary; a NaN or exploding loss exits non-zero.
"""

import gc
import math
import os
import resource
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from prepare import (MAX_SEQ_LEN, PRESET, TIME_BUDGET, PrepareError, Tokenizer, data_fingerprint, evaluate,
                     make_dataloader)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags)
# ---------------------------------------------------------------------------

# Model shape, per preset
DEPTH = {"gpu": 8, "cpu": 3}[PRESET]                  # transformer blocks
ASPECT_RATIO = {"gpu": 64, "cpu": 32}[PRESET]         # model_dim = DEPTH * ASPECT_RATIO, rounded up to HEAD_DIM
HEAD_DIM = {"gpu": 128, "cpu": 32}[PRESET]            # attention head size
WINDOW_PATTERN = {"gpu": "SSSL", "cpu": "L"}[PRESET]  # per layer: L = full context, S = half; the last layer is L

# Batch, per preset
TOTAL_BATCH_SIZE = {"gpu": 2**19, "cpu": 2**10}[PRESET]  # tokens per optimizer step
DEVICE_BATCH_SIZE = {"gpu": 128, "cpu": 8}[PRESET]       # rows per forward/backward; accumulation makes up the rest
EVAL_BATCH_SIZE = {"gpu": 64, "cpu": 16}[PRESET]         # rows per evaluation forward

# Optimization
OPTIMIZER = "muon"             # "muon": MuonAdamW below; "deepnested": MuonAdamW with learned corrections (DN_*)
MATRIX_OPTIMIZER = "muon"      # hidden matrices: "muon", or "adamw" for the ablation
MATRIX_LR = 0.04               # hidden matrices
EMBEDDING_LR = 0.6             # token and value embeddings (AdamW)
UNEMBEDDING_LR = 0.004         # lm_head (AdamW)
SCALAR_LR = 0.5                # per-layer residual scalars (AdamW)
WEIGHT_DECAY = 0.2             # cautious weight decay on hidden matrices, decayed linearly to 0
ADAM_BETAS = (0.8, 0.95)       # AdamW beta1, beta2
MUON_MOMENTUM_START = 0.85     # Nesterov momentum at step 0 ...
MUON_MOMENTUM_END = 0.95       # ... ramped linearly to this ...
MUON_MOMENTUM_RAMP_STEPS = {"gpu": 300, "cpu": 100}[PRESET]  # ... over this many steps
MUON_NS_STEPS = 5              # orthogonalisation iterations: Polar Express, then Newton-Schulz
MUON_BETA2 = 0.95              # NorMuon neuron-wise second-moment decay
WARMUP_RATIO = 0.0             # fraction of the budget spent warming the LR up
WARMDOWN_RATIO = 0.5           # fraction of the budget spent decaying the LR
FINAL_LR_FRAC = 0.0            # final LR as a fraction of the initial one

# DeepNested (OPTIMIZER = "deepnested"): MuonAdamW's groups and LRs times learned multipliers, learned momentum
DN_MODE = "simple"             # "simple": per-step hypergradients; "explicit": k-step unrolled meta-gradients
DN_META_LR = 1e-3              # Adam LR of the controller and the momentum network
DN_CONTROLLER_HIDDEN_DIM = 32  # LR controller width ...
DN_CONTROLLER_NUM_LAYERS = 2   # ... and depth (linear layers)
DN_MOMENTUM_HIDDEN_DIM = 64    # momentum network width ...
DN_MOMENTUM_NUM_LAYERS = 2     # ... and depth (linear layers)
DN_MIN_LR_MULT = 0.1           # the learned LR multipliers stay above this ...
DN_MAX_LR_MULT = 2.0           # ... and below this
DN_CONTROLLER_UPDATE_FREQ = 1  # steps between fresh multipliers and momentum coefficients (and simple-mode meta-steps)
DN_USE_PREPROCESSING = True    # standardise the meta-features by running statistics
DN_USE_CMS = False             # slower momentum levels for the hidden matrices ...
DN_CMS_FREQUENCIES = (1, 10, 100)  # ... updated every this many steps (1: the ordinary momentum)
DN_META_UPDATE_FREQ = 50       # explicit mode: steps between meta-updates ...
DN_K_UNROLL = 1                # ... each differentiating this many update steps (each more: +1.6 steps' time)
DN_META_ROWS = {"gpu": 16, "cpu": 4}[PRESET]  # rows of each batch in a meta-update (k_unroll + 1 passes on them)
DN_MAX_GRAD_NORM = 0.0         # clip the model's gradient norm to this before the update (0: off; the seed's 1.0)
DN_SAMPLE_SIZE = 4096          # entries per tensor sampled for the meta-features and signals
DN_META_GRAD_CLIP = 1.0        # the meta-gradient's norm is clipped to this
DN_BASE_LR = 3e-4              # a module other than this file's GPT: the seed's base_lr, one LR for every role
DN_USE_COMPILE = False         # torch.compile the controller and the momentum network
DN_USE_CUDA_GRAPH = False      # CUDA: replay the update (after clipping and the learned parts) as a CUDA graph ...
DN_CUDA_GRAPH_WARMUP_STEPS = 3  # ... captured after this many eager steps

# Run
SEED = int(os.environ.get("AUTORESEARCH_SEED", "42"))  # the initialisation; the data order is prepare's, fixed
RUN_DIR = os.environ.get("AUTORESEARCH_RUN_DIR")       # the checkpoint goes here when set
STARTUP_EXCLUDE_STEPS = {"gpu": 10, "cpu": 1}[PRESET]  # first steps (compilation) not counted in the budget
LOSS_LIMIT = 100.0             # a training loss above this (or NaN) ends the run with exit code 1

# ---------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
COMPILE = DEVICE.type == "cuda"  # a cold compile costs ~25 s on two CPU cores: not worth it there
AUTOCAST_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else None
PEAK_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense bf16


def compile_on_cuda(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True) if torch.cuda.is_available() else fn


def autocast():
    return torch.autocast(DEVICE.type, dtype=AUTOCAST_DTYPE, enabled=AUTOCAST_DTYPE is not None)

# ---------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer, n_layer):
    return layer % 2 == (n_layer - 1) % 2  # alternating layers, the last one included


def apply_rotary(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


_block_masks = {}


def windowed_attention(q, k, v, window):
    """Causal attention over (B, H, T, D), limited to the last `window` positions."""
    T = q.size(-2)
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q.is_cuda:  # flex_attention skips the blocks outside the band, not masks them
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        key = (T, window, q.device)
        if key not in _block_masks:
            def band(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
            _block_masks[key] = create_block_mask(band, None, None, T, T, device=q.device)
        return flex_attention(q, k, v, block_mask=_block_masks[key])
    i = torch.arange(T, device=q.device)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = min(32, config.n_embd)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, config.n_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q, k, v = (c(x).view(B, T, self.n_head, self.head_dim) for c in (self.c_q, self.c_k, self.c_v))
        if ve is not None:  # value residual (ResFormer), gated per head by the input
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = windowed_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        sizes, pattern = {"L": config.sequence_len, "S": config.sequence_len // 2}, config.window_pattern.upper()
        assert pattern and set(pattern) <= set(sizes), f"WINDOW_PATTERN may hold only S and L, got {pattern!r}"
        self.windows = [sizes[pattern[i % len(pattern)]] for i in range(config.n_layer - 1)] + [config.sequence_len]
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, config.n_embd)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.register_buffer("cos", None, persistent=False)  # init_weights computes both on the model's device
        self.register_buffer("sin", None, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform bound giving std n_embd^-0.5
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate 2*sigmoid(0) = 1: neutral
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        if self.wte.weight.is_cuda:  # embeddings are lookups: bf16 halves their memory traffic
            for embedding in (self.wte, *self.value_embeds.values()):
                embedding.to(dtype=torch.bfloat16)
        head_dim, device = self.config.n_embd // self.config.n_head, self.wte.weight.device  # rotary tables:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=device), inv_freq)
        self.cos, self.sin = (t[None, :, None, :].to(self.wte.weight.dtype) for t in (freqs.cos(), freqs.sin()))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Forward + backward FLOPs per token: 6 per matrix weight plus attention, as upstream."""
        lookups = self.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        dense = self.num_params() - lookups - self.resid_lambdas.numel() - self.x0_lambdas.numel()
        attention = sum(12 * self.config.n_embd * min(w, self.config.sequence_len) for w in self.windows)
        return 6 * dense + attention

    def forward(self, idx, targets=None):
        """Logits (B, T, vocab) for the inputs; with targets, the mean cross-entropy instead."""
        B, T = idx.size()
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.windows[i])
        logits = self.lm_head(norm(x)).float()
        logits = 15.0 * torch.tanh(logits / 15.0)  # soft cap
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

# ---------------------------------------------------------------------------
# Optimizer: MuonAdamW
# ---------------------------------------------------------------------------

def best_odd_quintic(l, u):
    """The odd quintic a x + b x^3 + c x^5 nearest to 1 on [l, u] in the max norm (Remez exchange)."""
    if l / u > 1 - 5e-6:
        return 15 / 8 / u, -10 / 8 / u**3, 3 / 8 / u**5  # the equioscillating quintic's limit as l -> u
    q, r = (3 * l + u) / 4, (l + 3 * u) / 4
    for _ in range(30):  # converged to float64 within ~10 exchanges
        rows = torch.tensor([[x, x**3, x**5, (-1.0) ** i] for i, x in enumerate((l, q, r, u))], dtype=torch.float64)
        a, b, c, _ = torch.linalg.solve(rows, torch.ones(4, dtype=torch.float64)).tolist()
        root = math.sqrt(9 * b * b - 20 * a * c)  # the error's interior extremes: roots of a + 3b x^2 + 5c x^4
        q, r = math.sqrt((-3 * b - root) / (10 * c)), math.sqrt((-3 * b + root) / (10 * c))
    return a, b, c


def polar_express(steps, floor=1e-3, safety=0.02, cushion=0.02):
    """Polar Express (Amsel et al. 2025) for `steps` iterations: greedily the odd quintic nearest to 1 on the
    singular values' interval [l, u], recentred, all but the last damped by `safety` against bf16 round-off. Five
    steps start from l = 0.001 (nanochat's coefficients); each step fewer from 3.5x higher (a middle step lifts small
    values ~4x): a shorter schedule is coarser, never truncated."""
    l, u, coefficients = floor * 3.5 ** max(0, 5 - steps), 1.0, []
    for i in range(steps):
        a, b, c = best_odd_quintic(max(l, cushion * u), u)
        scale = 2 / (a * (l + u) + b * (l**3 + u**3) + c * (l**5 + u**5))
        damp = 1 + safety if i < steps - 1 else 1.0
        a, b, c = a * scale / damp, b * scale / damp**3, c * scale / damp**5
        coefficients.append((a, b, c))
        l = a * l + b * l**3 + c * l**5
        u = 2 - l
    return coefficients


POLAR_EXPRESS = {steps: polar_express(steps) for steps in range(1, 17)}  # MUON_NS_STEPS -> its schedule


def orthogonalize(G, steps):
    """Approximate the polar factor U V^T of each matrix in G (..., m, n) in `steps` iterations; bf16 on CUDA."""
    X = G.bfloat16() if G.is_cuda else G.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the smaller Gram matrix
    for a, b, c in POLAR_EXPRESS[steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def normuon_rescale(X, second_moment, beta2, red_dim):
    """NorMuon: divide each neuron by its running RMS, then restore the matrix's Frobenius norm."""
    v_mean = X.float().square().mean(dim=red_dim, keepdim=True)
    red_size = X.size(red_dim)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_moment.lerp_(v_mean.to(second_moment.dtype), 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = (v_mean * red_size * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return X * (scale * (norm_before / norm_after.clamp_min(1e-10))).to(X.dtype)


@compile_on_cuda
def muon_step_fused(grads, params, momentum_buffer, second_moment, momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim):
    momentum = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)  # Nesterov
    g = normuon_rescale(orthogonalize(g, ns_steps), second_moment, beta2_t.to(torch.float32), red_dim)
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    decay = (g * params) >= 0  # cautious weight decay: only where the update agrees with the weight
    params.sub_(lr * g + lr * wd * params * decay)


@compile_on_cuda
def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1, bias2 = 1 - beta1_t ** step_t, 1 - beta2_t ** step_t
    p.add_(exp_avg / ((exp_avg_sq / bias2).sqrt() + eps_t), alpha=-(lr_t / bias1))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for hidden matrices (groups of one shape, stacked), AdamW for everything else."""

    def __init__(self, param_groups, scalar_device="cpu"):
        super().__init__(param_groups, defaults={})
        # each group's hyperparameters as 0-D tensors, so a compiled step does not recompile when a value changes
        keys = ("lr", "momentum", "wd", "beta1", "beta2", "eps")
        self.hyper = [{key: torch.zeros((), device=scalar_device) for key in keys} for _ in self.param_groups]

    def _load_hyper(self, group, h):
        """The group's current hyperparameters into its 0-D tensors h (Muon has no betas, AdamW no momentum)."""
        beta1, beta2 = group.get("betas", (0.0, group.get("beta2", 0.0)))
        for key, value in (("lr", group["lr"]), ("momentum", group.get("momentum", 0.0)), ("wd", group["weight_decay"]),
                           ("beta1", beta1), ("beta2", beta2), ("eps", group.get("eps", 0.0))):
            h[key].fill_(value)

    def _step_adamw(self, group, h, lr):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=lr.new_zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1  # in place: a tensor, like the hyperparameters
            adamw_step_fused(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr, h["beta1"],
                             h["beta2"], h["eps"], h["wd"])

    def _muon_state(self, group):
        params = group["params"]
        state = self.state[params[0]]
        if not state:
            rows, cols = params[0].shape
            state["momentum_buffer"] = params[0].new_zeros(len(params), rows, cols)
            state["second_moment"] = params[0].new_zeros((len(params), rows, 1) if rows >= cols else (len(params), 1, cols))
        return state

    def _muon_direction(self, group, h, state, grads):
        """What the fused Muon step reads as gradient, momentum buffer and momentum: Muon's own (Nesterov in the step)."""
        return grads, state["momentum_buffer"], h["momentum"]

    def _step_group(self, group, h, lr):
        """One group's update at the LR lr (a 0-D tensor), the other hyperparameters loaded into h."""
        if group["kind"] == "adamw":
            return self._step_adamw(group, h, lr)
        params = group["params"]
        if params[0].grad is None:
            return
        state, (rows, cols) = self._muon_state(group), params[0].shape
        grads, stacked = torch.stack([p.grad for p in params]), torch.stack(params)
        grads, buffer, momentum = self._muon_direction(group, h, state, grads)
        muon_step_fused(grads, stacked, buffer, state["second_moment"], momentum, lr * max(1.0, rows / cols) ** 0.5,
                        h["wd"], h["beta2"], group["ns_steps"], -1 if rows >= cols else -2)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self, loss=None):
        """One update; `loss` (this step's training loss) is unused here, learned optimizers read it."""
        for group, h in zip(self.param_groups, self.hyper):
            self._load_hyper(group, h)
            self._step_group(group, h, h["lr"])


def param_groups(model):
    """Groups by role: AdamW for embeddings, head and scalars; MATRIX_OPTIMIZER for hidden matrices."""
    lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at width 768
    adamw = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adamw, params=[model.lm_head.weight], lr=UNEMBEDDING_LR * lr_scale),
        dict(adamw, params=[model.wte.weight], lr=EMBEDDING_LR * lr_scale),
        dict(adamw, params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * lr_scale),
        dict(adamw, params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(adamw, params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    matrices = list(model.blocks.parameters())
    if MATRIX_OPTIMIZER == "adamw":
        groups.append(dict(adamw, params=matrices, lr=MATRIX_LR, weight_decay=WEIGHT_DECAY, matrix=True))
    elif MATRIX_OPTIMIZER == "muon":
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=MATRIX_LR,
                               momentum=MUON_MOMENTUM_START, ns_steps=MUON_NS_STEPS, beta2=MUON_BETA2,
                               weight_decay=WEIGHT_DECAY, matrix=True))
    else:
        raise ValueError(f"MATRIX_OPTIMIZER must be 'muon' or 'adamw', got {MATRIX_OPTIMIZER!r}")
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def build_optimizer(model):
    if OPTIMIZER == "muon":
        return MuonAdamW(param_groups(model))
    if OPTIMIZER == "deepnested":
        return DeepNestedOptimizer(model, groups=param_groups(model))  # every other setting: the DN_* constants
    raise ValueError(f"OPTIMIZER must be 'muon' or 'deepnested', got {OPTIMIZER!r}")

# ---------------------------------------------------------------------------
# Optimizer: DeepNested (learned LR multipliers and momentum)
# ---------------------------------------------------------------------------

HIDDEN, OTHER = 0, 1  # roles: hidden matrices; embeddings, head and scalars


def role_param_groups(model, base_lr, weight_decay):
    """MuonAdamW groups by role for any module: 2-D nn.Linear weights are hidden matrices (Muon), except an
    unembedding (out_features = some nn.Embedding's num_embeddings); every other parameter goes to AdamW.
    Muon's LR is scaled to AdamW's update RMS, so one base_lr serves both."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab, embedding_ids = {m.num_embeddings for m in embeddings}, {id(m.weight) for m in embeddings}
    hidden_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)
                  and m.out_features not in vocab and id(m.weight) not in embedding_ids}
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if id(p) in hidden_ids]
    groups = [dict(kind="adamw", params=[p for p in params if id(p) not in hidden_ids], lr=base_lr,
                   betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)]
    for rows, cols in sorted({p.shape for p in hidden}):
        # Muon's update has RMS ~ 1 / sqrt(max(rows, cols)) after MuonAdamW's sqrt(rows / cols) scaling; AdamW's ~ 0.2
        lr = 0.2 * base_lr * max(rows, cols) ** 0.5 / max(1.0, rows / cols) ** 0.5
        groups.append(dict(kind="muon", params=[p for p in hidden if p.shape == (rows, cols)], lr=lr,
                           momentum=MUON_MOMENTUM_END, ns_steps=MUON_NS_STEPS, beta2=MUON_BETA2,
                           weight_decay=weight_decay, matrix=True))
    return [g for g in groups if g["params"]]


def log_ratio(a, b):
    """log(a / b) of two non-negative statistics, finite and clipped to [-10, 10]."""
    return torch.log((a + 1e-30) / (b + 1e-30)).nan_to_num(0.0).clamp(-10.0, 10.0)


def cosine(dot, sq_a, sq_b):
    """dot / (|a| |b|); 0 where a or b is zero or non-finite, with a finite derivative (sqrt has none at 0)."""
    sq = sq_a * sq_b
    valid = (sq > 0) & sq.isfinite() & dot.isfinite()
    return torch.where(valid, dot.where(valid, 0.0) / sq.where(valid, 1.0).sqrt(), 0.0)


class MetaMLP(nn.Module):
    """A small tanh MLP whose last layer starts at zero: its output, a correction, is exactly 0 until it learns."""

    def __init__(self, n_in, n_out, hidden_dim, num_layers):
        super().__init__()
        dims = [n_in] + [hidden_dim] * (num_layers - 1) + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


class FeatureNorm(nn.Module):
    """Standardises feature columns by running (bias-corrected EMA) statistics, clipped to [-5, 5]."""

    def __init__(self, n, decay=0.99):
        super().__init__()
        self.decay, self.count = decay, 0
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.zeros(n))

    def forward(self, f):
        self.count += 1
        w = (1 - self.decay) / (1 - self.decay ** self.count)
        self.mean.lerp_(f.mean(0), w)
        self.var.lerp_((f - self.mean).square().mean(0), w)
        return ((f - self.mean) / (self.var + 1e-8).sqrt()).clamp(-5.0, 5.0)


class DeepNestedOptimizer(MuonAdamW):
    """MuonAdamW with learned residual corrections. A controller maps normalised statistics of each role (hidden
    matrices; the rest) to an LR multiplier in [DN_MIN_LR_MULT, DN_MAX_LR_MULT]; a momentum network maps those of
    each Muon matrix to its momentum decay, its Nesterov mix and (CMS) the weights of slower momentum levels. Both
    last layers start at zero: until they learn, the update is MuonAdamW's. Their signals come from a fixed random
    sample of DN_SAMPLE_SIZE entries per tensor, all that is stored of gradients and updates.
      simple:   the hypergradient d loss_{t+1} / d log m_t = -lr g_{t+1}.u_t, normalised to -cos(g_{t+1}, u_t), trains
                the controller; the momentum network learns to predict the next gradient, 1 - cos(direction_t, g_{t+1}),
                both every controller_update_freq steps.
      explicit: meta_update(), which the training loop calls every meta_update_freq steps, differentiates the
                loss on a held-out batch through k_unroll update steps.
    Non-finite gradients skip the step (skipped_steps), touching no state; a tensor with zero or non-finite features
    drops out of the meta-signal alone; a meta-step whose gradient is still non-finite counts in dropped_meta_steps."""
    horizon_range = math.log(2)  # the learned momentum halves or doubles the base momentum's horizon at most
    cms_max_weight = 0.5         # largest |weight| of a slower CMS level in the momentum mix

    def __init__(self, model, base_lr=None, meta_lr=DN_META_LR, momentum_hidden_dim=DN_MOMENTUM_HIDDEN_DIM,
                 momentum_num_layers=DN_MOMENTUM_NUM_LAYERS, controller_hidden_dim=DN_CONTROLLER_HIDDEN_DIM,
                 controller_num_layers=DN_CONTROLLER_NUM_LAYERS, mode=DN_MODE, use_cms_updates=DN_USE_CMS,
                 use_preprocessing=DN_USE_PREPROCESSING, weight_decay=WEIGHT_DECAY, max_grad_norm=DN_MAX_GRAD_NORM,
                 meta_update_freq=DN_META_UPDATE_FREQ, k_unroll=DN_K_UNROLL, use_compile=DN_USE_COMPILE,
                 controller_update_freq=DN_CONTROLLER_UPDATE_FREQ, use_cuda_graph=DN_USE_CUDA_GRAPH,
                 cuda_graph_warmup_steps=DN_CUDA_GRAPH_WARMUP_STEPS, groups=None):
        if mode not in ("simple", "explicit"):
            raise ValueError(f"mode={mode!r} is not built here (implicit-function hypergradients included): use "
                             "mode='explicit' for unrolled meta-gradients or mode='simple' for one-step ones.")
        if groups is None:  # the seed's call: this file's GPT keeps its tuned groups unless base_lr is given
            gpt = isinstance(model, GPT) and base_lr is None
            groups = param_groups(model) if gpt else role_param_groups(model, base_lr or DN_BASE_LR, weight_decay)
        device = groups[0]["params"][0].device
        if use_cuda_graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True captures the update on a CUDA device, and these parameters are on "
                             f"{device.type}: leave use_cuda_graph=False here.")
        for g in groups:
            g.setdefault("initial_lr", g["lr"])  # the LR schedule's reference (param_groups sets it)
            g["role"] = HIDDEN if g["kind"] == "muon" or g.get("matrix") else OTHER
        super().__init__(groups, scalar_device=device)  # on the device: a captured graph reads this step's values
        self.model, self.mode, self.max_grad_norm = model, mode, max_grad_norm
        self.meta_update_freq, self.k_unroll, self.controller_update_freq = meta_update_freq, k_unroll, controller_update_freq
        self.log_min, self.log_max = math.log(DN_MIN_LR_MULT), math.log(DN_MAX_LR_MULT)
        self.cms_frequencies = tuple(f for f in DN_CMS_FREQUENCIES if f > 1) if use_cms_updates else ()
        muon = [g for g in self.param_groups if g["kind"] == "muon"]
        ordered = muon + [g for g in self.param_groups if g["kind"] != "muon"]  # the momentum network's tensors first
        self.tensors = [p for g in ordered for p in g["params"]]
        self.n_hidden = 0
        for g in muon:
            g["hidden_slice"] = slice(self.n_hidden, self.n_hidden + len(g["params"]))
            self.n_hidden += len(g["params"])
        generator = torch.Generator().manual_seed(0)
        self.sample_idx = [torch.randperm(p.numel(), generator=generator)[:DN_SAMPLE_SIZE].sort().values
                           .to(p.device, torch.int32) for p in self.tensors]
        self.sizes = torch.tensor([len(i) for i in self.sample_idx], device=device)
        self.n_hidden_samples = sum(len(i) for i in self.sample_idx[:self.n_hidden])
        self.role = torch.tensor([g["role"] for g in ordered for _ in g["params"]], device=device)
        levels = len(self.cms_frequencies)
        self.controller = MetaMLP(5 + 2, 2, controller_hidden_dim, controller_num_layers).to(device)
        self.momentum_net = MetaMLP(6 + levels, 2 + levels, momentum_hidden_dim, momentum_num_layers).to(device)
        self.controller_norm = (FeatureNorm(5) if use_preprocessing else nn.Identity()).to(device)
        self.momentum_norm = (FeatureNorm(6 + levels) if use_preprocessing else nn.Identity()).to(device)
        if use_compile:
            self.controller.compile()
            self.momentum_net.compile()
        self.meta_params = [*self.controller.parameters(), *self.momentum_net.parameters()]
        self.meta_optimizer = torch.optim.Adam(self.meta_params, lr=meta_lr, foreach=True)
        self.ema_grad, self.ema_loss = None, torch.tensor(float("nan"), device=device)
        self.record, self.pending, self.dn_step, self.skipped_steps, self.dropped_meta_steps = None, False, 0, 0, 0
        # what the update reads besides the hyperparameters, overwritten in place at each refresh (see _update)
        self.multipliers, self.no_momentum = torch.ones(2, device=device), torch.zeros((), device=device)
        self.shift, self.cms_weights = (torch.zeros(self.n_hidden, n, device=device) for n in (2, levels))
        self.cms_due = torch.zeros(levels, device=device)
        self.capture_after = max(cuda_graph_warmup_steps, 1) if use_cuda_graph else math.inf  # eager steps
        self.graph = self.graph_grads = None

    # -- sampled statistics ------------------------------------------------------------------------------------

    def _gather(self, tensors):
        """The sampled entries of tensors aligned with self.tensors (None: zeros), as one fp32 vector."""
        return torch.cat([torch.zeros(0, device=self.sizes.device)] + [
            t.reshape(-1).index_select(0, i).float() if t is not None else torch.zeros(len(i), device=i.device)
            for t, i in zip(tensors, self.sample_idx)])

    def _hidden_state(self, key):
        """Each Muon matrix's slice of its group's stacked state tensor `key` (None where there is none yet)."""
        return [matrix for g in self.param_groups if g["kind"] == "muon"
                for matrix in self._muon_state(g).get(key, [None] * len(g["params"]))]

    def _per_tensor(self, x, n):
        """Sums of the sampled products x (samples, k) per tensor, for the first n tensors."""
        if n == 0:  # no Muon matrices (MATRIX_OPTIMIZER = "adamw")
            return x.new_zeros(0, x.size(1))
        return torch.segment_reduce(x, "sum", lengths=self.sizes[:n], axis=0)

    def _per_role(self, sums):
        """Sums per role (hidden matrices, the rest) of per-tensor sums (tensors, k)."""
        return torch.zeros(2, sums.size(1), device=sums.device).index_add(0, self.role, sums)

    # -- the learned parts -------------------------------------------------------------------------------------

    def _log_multipliers(self, x):
        """log LR multiplier per role: 0 at init, bounded smoothly to [log DN_MIN_LR_MULT, log DN_MAX_LR_MULT]."""
        o = self.controller(x).diagonal()  # an output per role: one role's signal does not drag the other's
        bound = torch.where(o > 0, self.log_max, -self.log_min)
        return bound * torch.tanh(o / bound)

    def _momentum_corrections(self, y):
        """Per Muon matrix: shifts s of its momentum decay and Nesterov mix, each b - (1 - b) * s for the base
        momentum b (b at init; the horizon 1 / (1 - b) at most halved or doubled), and its CMS level weights."""
        o = self.momentum_net(y)
        return torch.expm1(self.horizon_range * torch.tanh(o[:, :2])), self.cms_max_weight * torch.tanh(o[:, 2:])

    def _features(self, g, p, m, loss):
        """Normalised statistics of the gradient g, the weights p and the momentum m (samples), never raw norms.
        x, per role, for the controller: log |g| / EMA |g|, log |u| / |p| for the last update u, cos(g, u),
        log loss / EMA loss, the LR schedule's factor, then the role as one-hot. y, per Muon matrix, for the
        momentum network: cos(g, m), cos(g, g_prev), log |g| / EMA |g|, the loss term, log(1 - base momentum),
        the schedule's factor, and cos(g, level) per CMS level."""
        prev, H, n = self.record, self.n_hidden_samples, len(self.tensors)
        u, g_prev = (prev["u"], prev["g"]) if prev else (torch.zeros_like(g), torch.zeros_like(g[:H]))
        levels = prev["c"] if prev and self.cms_frequencies else [torch.zeros_like(m)] * len(self.cms_frequencies)
        sums = self._per_tensor(torch.stack([g * g, g * u, u * u, p * p], 1), n)
        if self.ema_grad is None:
            self.ema_grad = sums[:, 0].clone()
        gg, gu, uu, pp, ema = self._per_role(torch.cat([sums, self.ema_grad[:, None]], 1)).unbind(1)
        loss = torch.as_tensor(float("nan") if loss is None else loss, dtype=torch.float32, device=g.device)
        loss_scale = log_ratio(loss, self.ema_loss)
        schedule = {gr["role"]: gr["lr"] / gr["initial_lr"] for gr in self.param_groups}
        lr_factor = torch.tensor([schedule.get(HIDDEN, 1.0), schedule.get(OTHER, 1.0)], device=g.device)
        step_size = log_ratio(uu.sqrt(), pp.sqrt()) if prev else torch.zeros_like(uu)
        x = torch.stack([log_ratio(gg.sqrt(), ema.sqrt()), step_size, cosine(gu, gg, uu), loss_scale.expand(2),
                         lr_factor], 1)
        x = torch.cat([self.controller_norm(x), torch.eye(2, device=g.device)], 1)
        gh = g[:H]
        hidden = self._per_tensor(torch.stack([gh * m, m * m, gh * g_prev, g_prev * g_prev]
                                              + [gh * c for c in levels] + [c * c for c in levels], 1), self.n_hidden)
        hg = sums[:self.n_hidden, 0]
        base = torch.tensor([gr["momentum"] for gr in self.param_groups if gr["kind"] == "muon" for _ in gr["params"]],
                            device=g.device)
        L = len(levels)
        y = torch.stack([cosine(hidden[:, 0], hg, hidden[:, 1]), cosine(hidden[:, 2], hg, hidden[:, 3]),
                         log_ratio(hg.sqrt(), self.ema_grad[:self.n_hidden].sqrt()), loss_scale.expand(self.n_hidden),
                         torch.log1p(-base), lr_factor[HIDDEN].expand(self.n_hidden)]
                        + [cosine(hidden[:, 4 + l], hg, hidden[:, 4 + L + l]) for l in range(L)], 1)
        self.ema_grad.lerp_(sums[:, 0], 0.1)
        fresh = torch.where(self.ema_loss.isfinite(), self.ema_loss.lerp(loss, 0.05), loss)
        self.ema_loss = torch.where(loss.isfinite(), fresh, self.ema_loss)
        return x, self.momentum_norm(y), base

    def _prediction_loss(self, rec, g_next):
        """Mean over Muon matrices of 1 - cos(direction_t, g_{t+1}). The direction is linear in the stored samples,
        lerp(g_t, mix, nu) with mix = (1 - sum w) m_t + sum_l w_l c_l and m_t = lerp(m_{t-1}, g_t, 1 - beta),
        so its cosine follows from their inner products per matrix, and autograd only sees a few numbers each."""
        v = [rec["g"], rec["m"], *rec["c"]]
        k = len(v)
        sums = self._per_tensor(torch.stack([a * g_next for a in v] + [a * b for a in v for b in v]
                                            + [g_next * g_next], 1), self.n_hidden)
        vq, gram, qq = sums[:, :k], sums[:, k:-1].view(-1, k, k), sums[:, -1]
        shift, w = self._momentum_corrections(rec["y"])
        base = rec["base"][:, None]
        beta, nu = (base - (1 - base) * shift).unbind(1)
        keep = nu * (1 - w.sum(1))  # the weight of m_t in the direction
        a = torch.cat([torch.stack([1 - nu + keep * (1 - beta), keep * beta], 1), nu[:, None] * w], 1)
        dq, dd = (a * vq).sum(1), torch.einsum("ni,nij,nj->n", a, gram, a)
        return (1 - cosine(dq, dd, qq)).sum() / max(self.n_hidden, 1)

    def _learn(self, g):
        """Simple mode: a meta-step of both networks on the signal that this gradient gives the last refresh."""
        rec = self.record
        sums = self._per_tensor(torch.stack([g * rec["u"], g * g, rec["u"] * rec["u"]], 1), len(self.tensors))
        hypergradient = cosine(*self._per_role(sums).unbind(1))
        with torch.enable_grad():  # hypergradient > 0: the last step fell short, a larger multiplier would have helped
            controller_loss = -(hypergradient * self._log_multipliers(rec["x"])).sum()
            (controller_loss + self._prediction_loss(rec, g[:self.n_hidden_samples])).backward()
        self._meta_step()

    @torch.no_grad()
    def _update_meta_components(self, loss=None):
        """The seed's manual meta-update (simple mode): learn now from the gradients in .grad, the signal for the
        last refresh, which step() then does not learn from again. `loss` is accepted for the seed's signature."""
        if self.mode != "simple":
            raise ValueError("explicit mode's meta-update needs batches: call meta_update(train_batches, meta_batch).")
        if self.pending:
            self._learn(self._gather([p.grad for p in self.tensors]))
            self.pending = False

    def _meta_step(self):
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(self.meta_params, DN_META_GRAD_CLIP)):
            self.meta_optimizer.step()
        else:
            self.dropped_meta_steps += 1
        self.meta_optimizer.zero_grad(set_to_none=True)

    # -- the update --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, loss=None):
        """One update; `loss` (this step's training loss, a float or a tensor) is one of the controller's inputs."""
        grads = [p.grad for p in self.tensors if p.grad is not None]
        if not grads:
            return
        norm = torch.stack([n.float() for n in torch._foreach_norm(grads)]).norm()
        if not torch.isfinite(norm):
            self.skipped_steps += 1
            return
        if self.max_grad_norm > 0:
            torch._foreach_mul_(grads, (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
        t, H = self.dn_step, self.n_hidden_samples
        refresh = t % self.controller_update_freq == 0  # fresh multipliers and momentum coefficients this step
        learn = self.pending and self.mode == "simple"  # this gradient is the signal for the last refresh
        if refresh or learn:
            g = self._gather([p.grad for p in self.tensors])
        if learn:
            self._learn(g)
        if refresh:
            p = self._gather(self.tensors)
            record = dict(g=g[:H].clone(), m=self._gather(self._hidden_state("momentum_buffer")))
            x, y, base = self._features(g, p, record["m"], loss)
            torch._foreach_copy_([self.multipliers, self.shift, self.cms_weights],
                                 [self._log_multipliers(x).exp(), *self._momentum_corrections(y)])
        for group, h in zip(self.param_groups, self.hyper):
            self._load_hyper(group, h)
        self.cms_due.copy_(torch.tensor([float(t % f == 0) for f in self.cms_frequencies]))
        self._update(t)
        if refresh:
            record.update(x=x, y=y, base=base, u=p - self._gather(self.tensors),
                          c=[self._gather(self._hidden_state(f"cms_{f}")) for f in self.cms_frequencies])
            self.record = record
        self.pending = refresh
        self.dn_step += 1

    def _update(self, t):
        """The update of every group: eager, or (use_cuda_graph) replayed from a CUDA graph captured once after the
        warm-up steps. It reads this step's values from tensors written in place, and the gradients from copies at
        fixed addresses (one more copy: backward allocates .grad anew); a step that lacks a gradient runs eagerly."""
        grads = [p.grad for p in self.tensors]
        if self.graph is not None and None not in grads:
            torch._foreach_copy_(self.graph_grads, grads)
            self.graph.replay()
            return
        for group, h in zip(self.param_groups, self.hyper):
            self._step_group(group, h, h["lr"] * self.multipliers[group["role"]])
        if self.graph is None and t + 1 >= self.capture_after and None not in grads:
            self.graph_grads = [g.clone() for g in grads]
            for p, g in zip(self.tensors, self.graph_grads):
                p.grad = g
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the update without running it (this step's ran above)
                for group, h in zip(self.param_groups, self.hyper):
                    self._step_group(group, h, h["lr"] * self.multipliers[group["role"]])

    def _muon_direction(self, group, h, state, G):
        """The learned direction d: momentum decay and Nesterov mix shifted per matrix, slower CMS levels mixed in. The
        fused step then has no momentum: it only orthogonalises, rescales and applies d (which doubles as its buffer)."""
        i, buf, b = group["hidden_slice"], state["momentum_buffer"], h["momentum"]
        beta, nu = (b - (1 - b) * self.shift[i]).to(buf.dtype).unbind(1)
        buf.lerp_(G, (1 - beta).view(-1, 1, 1))
        mix = buf
        for level, f in enumerate(self.cms_frequencies):
            if f"cms_{f}" not in state:
                state[f"cms_{f}"] = torch.zeros_like(buf, dtype=torch.bfloat16 if buf.is_cuda else buf.dtype)
            slow = state[f"cms_{f}"]
            slow.lerp_(buf.to(slow.dtype), ((1 - b) * self.cms_due[level]).to(slow.dtype))  # due: every f steps
            mix = mix + self.cms_weights[i, level].view(-1, 1, 1) * (slow.to(buf.dtype) - buf)
        d = G.lerp_(mix, nu.view(-1, 1, 1))
        return d, d, self.no_momentum

    # -- explicit mode -----------------------------------------------------------------------------------------

    def meta_update(self, train_batches, meta_batch):
        """One meta-step of both networks: from the current weights (left unchanged), k_unroll updates on the last
        train batches, then the loss on meta_batch (held out from training), differentiated back to the controller
        and the momentum network through every update's dependence on the multipliers and the momentum corrections.
        Each unrolled gradient is taken at the unrolled weights but held constant (first-order: no double backward),
        so a meta-update costs k_unroll + 1 forward/backward passes on DN_META_ROWS rows and the updates' own graph.
        A batch: the model's arguments, with which it returns the loss. Returns the meta loss."""
        if self.record is None:
            return None
        names = {id(p): name for name, p in self.model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in self.param_groups]
        keys = [k for ks in groups for k in ks]
        theta = {name: p.detach() for name, p in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())
        rec = self.record
        with torch.enable_grad():
            with torch.autocast(rec["x"].device.type, enabled=False):  # the model may run in bf16, not these
                mult = self._log_multipliers(rec["x"]).exp()
                shift, w = self._momentum_corrections(rec["y"])
            inner = [self._unroll_state(g) for g in self.param_groups]
            for batch in list(train_batches)[-self.k_unroll:]:
                at = {k: v.detach().requires_grad_(k in keys) for k, v in theta.items()}
                loss = functional_call(self.model, (at, buffers), tuple(batch))
                grads = dict(zip(keys, torch.autograd.grad(loss, [at[k] for k in keys], allow_unused=True)))
                for g, ks, s in zip(self.param_groups, groups, inner):
                    new = self._unrolled_update(g, [theta[k] for k in ks], [grads[k] for k in ks], s,
                                                g["lr"] * mult[g["role"]], shift, w)
                    theta.update(zip(ks, new))
            meta_loss = functional_call(self.model, (theta, buffers), tuple(meta_batch))
            meta_grads = torch.autograd.grad(meta_loss, self.meta_params, allow_unused=True)
        for p, grad in zip(self.meta_params, meta_grads):
            p.grad = grad
        self._meta_step()
        return meta_loss.detach()

    def _unroll_state(self, group):
        """The optimizer state a differentiable unroll starts from (read, never written)."""
        if group["kind"] == "adamw":
            states = [self.state[p] for p in group["params"]]
            return dict(step=int(states[0].get("step", 0)),
                        m=[s["exp_avg"] if s else torch.zeros_like(p) for s, p in zip(states, group["params"])],
                        v=[s["exp_avg_sq"] if s else torch.zeros_like(p) for s, p in zip(states, group["params"])])
        state = self._muon_state(group)
        buf = state["momentum_buffer"]
        return dict(buf=buf, second_moment=state["second_moment"],
                    cms=[state[f"cms_{f}"].to(buf.dtype) for f in self.cms_frequencies if f"cms_{f}" in state])

    def _unrolled_update(self, group, P, G, s, lr, shift, w):
        """MuonAdamW's update of one group as a differentiable function (explicit mode); advances the state s."""
        G = [g if g is not None else torch.zeros_like(p) for p, g in zip(P, G)]
        if group["kind"] == "adamw":
            (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            s["step"] += 1
            s["m"] = [m.lerp(g, 1 - beta1) for m, g in zip(s["m"], G)]
            s["v"] = [v.lerp(g * g, 1 - beta2) for v, g in zip(s["v"], G)]
            bias1, bias2 = 1 - beta1 ** s["step"], 1 - beta2 ** s["step"]
            # + 1e-30 under the root: sqrt has an infinite derivative at 0 (entries that never had a gradient)
            return [p * (1 - lr * wd) - lr / bias1 * m / ((v / bias2 + 1e-30).sqrt() + eps)
                    for p, m, v in zip(P, s["m"], s["v"])]
        (rows, cols), i, b = P[0].shape, group["hidden_slice"], group["momentum"]
        G, P = torch.stack(G), torch.stack(P)
        beta, nu = (b - (1 - b) * shift[i]).unbind(1)
        s["buf"] = s["buf"].lerp(G, (1 - beta).view(-1, 1, 1))
        mix = s["buf"] + sum(w[i, l].view(-1, 1, 1) * (c - s["buf"]) for l, c in enumerate(s["cms"]))
        d = G.lerp(mix, nu.view(-1, 1, 1))
        s["second_moment"] = s["second_moment"].clone()  # normuon_rescale updates it in place
        U = normuon_rescale(orthogonalize(d, group["ns_steps"]), s["second_moment"], group["beta2"],
                            -1 if rows >= cols else -2)
        decay = (U * P) >= 0
        lr = lr * max(1.0, rows / cols) ** 0.5
        return list((P - lr * (U + group["weight_decay"] * P * decay)).unbind(0))

    # -- reports -----------------------------------------------------------------------------------------------

    def get_lr_multipliers(self):
        """The current LR multiplier of each parameter group (one per role, shared by the role's groups)."""
        return self.multipliers.cpu()[[g["role"] for g in self.param_groups]]

    def get_momentum_stats(self):
        """Norms of the momentum (Muon buffers, AdamW first moments) per group and in total."""
        norms = []
        for g in self.param_groups:
            key = "momentum_buffer" if g["kind"] == "muon" else "exp_avg"  # Muon's: stacked, in its first param's state
            states = [self.state[p] for p in g["params"] if key in self.state.get(p, {})]
            norms.append(math.sqrt(sum(s[key].float().square().sum().item() for s in states)))
        return dict(momentum_total_norm=math.sqrt(sum(n * n for n in norms)), param_group_norms=norms)

# ---------------------------------------------------------------------------
# Schedules (pure functions of progress = training seconds / budget, or of the step)
# ---------------------------------------------------------------------------

def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / max(MUON_MOMENTUM_RAMP_STEPS, 1), 1.0)
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def apply_schedules(optimizer, progress, step):
    """Every group's LR, Muon momentum and (hidden matrices) weight decay at this point of the run; the LR factor."""
    lrm = get_lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = get_muon_momentum(step)
        if group.get("matrix"):
            group["weight_decay"] = get_weight_decay(progress)
    return lrm

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

def build_model(vocab_size, device=DEVICE):
    model_dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH,
                       n_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def load_checkpoint(path, device=DEVICE):
    """The model a run saved, rebuilt the way training built it (used for re-evaluation)."""
    checkpoint = torch.load(path, map_location=device)
    with torch.device("meta"):
        model = GPT(GPTConfig(**checkpoint["config"]))
    model.to_empty(device=device)
    model.init_weights()
    model.load_state_dict(checkpoint["state_dict"])
    return model


def peak_memory_mb():
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux

# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

def main():
    t_start = time.time()
    torch.manual_seed(SEED)
    torch.set_float32_matmul_precision("high")
    try:
        tokenizer = Tokenizer.from_directory()
        fingerprint = data_fingerprint()
    except PrepareError as e:
        sys.exit(f"train.py: {e}")

    model = build_model(tokenizer.get_vocab_size())
    optimizer = build_optimizer(model)
    step_model = torch.compile(model, dynamic=False) if COMPILE else model
    tokens_per_pass = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_pass == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN"
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_pass
    flops_per_token = model.flops_per_token()
    peak = (next((flops for gpu, flops in PEAK_FLOPS.items() if gpu in torch.cuda.get_device_name()), None)
            if DEVICE.type == "cuda" else None)
    print(f"device: {DEVICE.type} | preset: {PRESET} | params: {model.num_params():,} | "
          f"budget: {TIME_BUDGET:g}s | grad accumulation: {grad_accum_steps} | data: {fingerprint}")

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=DEVICE)
    meta_loader = (make_dataloader(tokenizer, DN_META_ROWS, MAX_SEQ_LEN, "meta", device=DEVICE)
                   if OPTIMIZER == "deepnested" and DN_MODE == "explicit" else None)
    recent_batches = deque(maxlen=DN_K_UNROLL)  # what explicit meta-updates unroll over
    x, y, epoch = next(train_loader)
    tty = sys.stdout.isatty()
    smooth_loss, training_time, step = 0.0, 0.0, 0
    t_training = time.time()
    while True:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with autocast():
                loss = step_model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            if meta_loader is not None:
                recent_batches.append((x[:DN_META_ROWS], y[:DN_META_ROWS]))
            x, y, epoch = next(train_loader)
        progress = min(training_time / TIME_BUDGET, 1.0)
        lrm = apply_schedules(optimizer, progress, step)
        optimizer.step(train_loss)
        model.zero_grad(set_to_none=True)
        if meta_loader is not None and (step + 1) % optimizer.meta_update_freq == 0:
            with autocast():
                optimizer.meta_update(recent_batches, next(meta_loader)[:2])
        loss_value = train_loss.item()
        if not math.isfinite(loss_value) or loss_value > LOSS_LIMIT:
            print(f"\nFAIL: training loss {loss_value} at step {step} (NaN or above {LOSS_LIMIT:g}); stopping.")
            sys.exit(1)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        if step >= STARTUP_EXCLUDE_STEPS:
            training_time += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        mfu = f"{100 * flops_per_token * TOTAL_BATCH_SIZE / dt / peak:.1f}%" if peak else "n/a"
        print(f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt * 1000:.0f}ms | tok/sec: {int(TOTAL_BATCH_SIZE / dt):,} | mfu: {mfu} | epoch: {epoch} | "
              f"remaining: {max(0.0, TIME_BUDGET - training_time):.0f}s", end="\r" if tty else "\n", flush=True)
        if step == 0:
            gc.collect()
            gc.freeze()  # Python's collector causes long stalls; nothing cyclic is made in the loop
            gc.disable()
        step += 1
        if step > STARTUP_EXCLUDE_STEPS and training_time >= TIME_BUDGET:
            break
    if tty:
        print()
    timed_steps = step - STARTUP_EXCLUDE_STEPS

    if RUN_DIR:
        os.makedirs(RUN_DIR, exist_ok=True)
        torch.save({"config": asdict(model.config), "state_dict": model.state_dict(), "step": step, "seed": SEED},
                   os.path.join(RUN_DIR, "checkpoint.pt"))
    model.eval()
    with autocast():
        metrics = evaluate(step_model, tokenizer, EVAL_BATCH_SIZE, device=DEVICE)

    tokens_per_second = timed_steps * TOTAL_BATCH_SIZE / training_time if training_time > 0 else 0.0
    mfu = 100 * flops_per_token * tokens_per_second / peak if peak else float("nan")
    summary = dict(
        val_bpb=f"{metrics['val_bpb']:.6f}", val_loss=f"{metrics['val_loss']:.6f}",
        val_accuracy=f"{metrics['val_accuracy']:.6f}", val_perplexity=f"{metrics['val_perplexity']:.4f}",
        training_seconds=f"{training_time:.1f}", total_seconds=f"{time.time() - t_start:.1f}",
        startup_seconds=f"{t_training - t_start:.1f}", peak_memory_mb=f"{peak_memory_mb():.1f}",
        mfu_percent=f"{mfu:.2f}", tokens_per_second=f"{tokens_per_second:.0f}",
        total_tokens_M=f"{step * TOTAL_BATCH_SIZE / 1e6:.2f}", num_steps=step,
        num_params_M=f"{model.num_params() / 1e6:.2f}", depth=DEPTH, optimizer=OPTIMIZER,
        matrix_optimizer=MATRIX_OPTIMIZER, preset=PRESET, device=DEVICE.type, seed=SEED, data_fingerprint=fingerprint,
    )
    if OPTIMIZER == "deepnested":
        summary.update(dn_lr_multipliers=",".join(f"{m:.4f}" for m in optimizer.get_lr_multipliers().tolist()),
                       dn_skipped_steps=optimizer.skipped_steps, dn_dropped_meta_steps=optimizer.dropped_meta_steps)
    print("---")
    width = max(len(key) for key in summary) + 2
    for key, value in summary.items():
        print(f"{key + ':':<{width}}{value}")


if __name__ == "__main__":
    main()
