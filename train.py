"""
Pretraining script: a GPT, its optimizers (Muon/NorMuon + AdamW) and a fixed-time training loop,
in one file. This is the only file an experiment edits; prepare.py holds the data and the metric.

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
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import (MAX_SEQ_LEN, PRESET, TIME_BUDGET, PrepareError, Tokenizer, data_fingerprint, evaluate,
                     make_dataloader)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags)
# ---------------------------------------------------------------------------

# Model shape, per preset
DEPTH = {"gpu": 8, "cpu": 4}[PRESET]                  # transformer blocks
ASPECT_RATIO = {"gpu": 64, "cpu": 32}[PRESET]         # model_dim = DEPTH * ASPECT_RATIO, rounded up to HEAD_DIM
HEAD_DIM = {"gpu": 128, "cpu": 32}[PRESET]            # attention head size
WINDOW_PATTERN = {"gpu": "SSSL", "cpu": "L"}[PRESET]  # per layer: L = full context, S = half; the last layer is L

# Batch, per preset
TOTAL_BATCH_SIZE = {"gpu": 2**19, "cpu": 2**13}[PRESET]  # tokens per optimizer step
DEVICE_BATCH_SIZE = {"gpu": 128, "cpu": 32}[PRESET]      # rows per forward/backward; accumulation makes up the rest
EVAL_BATCH_SIZE = {"gpu": 64, "cpu": 64}[PRESET]         # rows per evaluation forward

# Optimization
OPTIMIZER = "muon"             # "muon": MuonAdamW below
MATRIX_OPTIMIZER = "muon"      # hidden matrices: "muon", or "adamw" for the ablation
MATRIX_LR = 0.04               # hidden matrices
EMBEDDING_LR = 0.6             # token and value embeddings (AdamW)
UNEMBEDDING_LR = 0.004         # lm_head (AdamW)
SCALAR_LR = 0.5                # per-layer residual scalars (AdamW)
WEIGHT_DECAY = 0.2             # cautious weight decay on hidden matrices, decayed linearly to 0
ADAM_BETAS = (0.8, 0.95)       # AdamW beta1, beta2
MUON_MOMENTUM_START = 0.85     # Nesterov momentum at step 0 ...
MUON_MOMENTUM_END = 0.95       # ... ramped linearly to this ...
MUON_MOMENTUM_RAMP_STEPS = 300  # ... over this many steps
MUON_NS_STEPS = 5              # orthogonalisation iterations: Polar Express, then Newton-Schulz
MUON_BETA2 = 0.95              # NorMuon neuron-wise second-moment decay
WARMUP_RATIO = 0.0             # fraction of the budget spent warming the LR up
WARMDOWN_RATIO = 0.5           # fraction of the budget spent decaying the LR
FINAL_LR_FRAC = 0.0            # final LR as a fraction of the initial one

# Run
SEED = int(os.environ.get("AUTORESEARCH_SEED", "42"))
RUN_DIR = os.environ.get("AUTORESEARCH_RUN_DIR")       # the checkpoint goes here when set
STARTUP_EXCLUDE_STEPS = {"gpu": 10, "cpu": 1}[PRESET]  # first steps (compilation) not counted in the budget
LOSS_LIMIT = 100.0             # a training loss above this (or NaN) ends the run with exit code 1

# ---------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    DEVICE = torch.device("mps")
else:
    DEVICE = torch.device("cpu")
COMPILE = DEVICE.type == "cuda"  # a cold compile costs ~25 s on two CPU cores: not worth it there
AUTOCAST_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else None
PEAK_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense bf16


def compile_on_cuda(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True) if torch.cuda.is_available() else fn


def autocast():
    if AUTOCAST_DTYPE is None:
        return torch.autocast(device_type="cpu", enabled=False)
    return torch.autocast(device_type=DEVICE.type, dtype=AUTOCAST_DTYPE)

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
    if q.is_cuda:  # flex_attention skips the blocks outside the band instead of masking them
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
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
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
        self.windows = self._windows(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, config.n_embd)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        cos, sin = self._rotary(config.sequence_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _windows(config):
        sizes = {"L": config.sequence_len, "S": config.sequence_len // 2}
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= set(sizes), f"WINDOW_PATTERN may hold only S and L, got {pattern!r}"
        windows = [sizes[pattern[i % len(pattern)]] for i in range(config.n_layer)]
        windows[-1] = config.sequence_len
        return windows

    @staticmethod
    def _rotary(seq_len, head_dim, base=10000, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

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
        cos, sin = self._rotary(self.config.sequence_len, self.config.n_embd // self.config.n_head, device=self.wte.weight.device)
        self.cos, self.sin = cos, sin
        if self.wte.weight.is_cuda:  # embeddings are lookups: bf16 halves their memory traffic
            self.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

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
        cos_sin = self.cos[:, :T].to(self.wte.weight.dtype if idx.is_cuda else torch.float32), self.sin[:, :T]
        cos_sin = (cos_sin[0], cos_sin[1].to(cos_sin[0].dtype))
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

# Polar Express coefficients (Amsel et al. 2025) for the first five iterations, tuned as a sequence;
# later iterations use the quintic Newton-Schulz map with fixed point 1 and zero slope there, so they
# keep converging instead of repeating a tuned step (MUON_NS_STEPS = 7 really runs 7 iterations).
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
NEWTON_SCHULZ = (1.875, -1.25, 0.375)


def orthogonalize(G, steps):
    """Approximate the polar factor U V^T of each matrix in G (..., m, n); bf16 on CUDA."""
    X = G.bfloat16() if G.is_cuda else G.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the smaller Gram matrix
    for i in range(steps):
        a, b, c = POLAR_EXPRESS[i] if i < len(POLAR_EXPRESS) else NEWTON_SCHULZ
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
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    p.add_(exp_avg / ((exp_avg_sq / bias2).sqrt() + eps_t), alpha=-(lr_t / bias1))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for hidden matrices (groups of one shape, stacked), AdamW for everything else."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # 0-D tensors, so a compiled step does not recompile when a value changes
        self._t = {k: torch.tensor(0.0) for k in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _step_adamw(self, group):
        t = self._t
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            for key, value in (("step", state["step"]), ("lr", group["lr"]), ("beta1", group["betas"][0]),
                               ("beta2", group["betas"][1]), ("eps", group["eps"]), ("wd", group["weight_decay"])):
                t[key].fill_(value)
            adamw_step_fused(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _muon_state(self, group):
        params = group["params"]
        state = self.state[params[0]]
        if not state:
            rows, cols = params[0].shape
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_moment"] = torch.zeros(moment_shape, dtype=params[0].dtype, device=params[0].device)
        return state

    def _step_muon(self, group):
        params = group["params"]
        if not params or params[0].grad is None:
            return
        state = self._muon_state(group)
        rows, cols = params[0].shape
        grads, stacked = torch.stack([p.grad for p in params]), torch.stack(params)
        t = self._t
        t["momentum"].fill_(group["momentum"])
        t["beta2"].fill_(group["beta2"])
        t["lr"].fill_(group["lr"] * max(1.0, rows / cols) ** 0.5)
        t["wd"].fill_(group["weight_decay"])
        muon_step_fused(grads, stacked, state["momentum_buffer"], state["second_moment"], t["momentum"],
                        t["lr"], t["wd"], t["beta2"], group["ns_steps"], -1 if rows >= cols else -2)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)


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
    groups = [g for g in groups if g["params"]]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def build_optimizer(model):
    if OPTIMIZER == "muon":
        return MuonAdamW(param_groups(model))
    raise ValueError(f"OPTIMIZER must be 'muon', got {OPTIMIZER!r}")

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


def peak_flops():
    if DEVICE.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)

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
    flops_per_token, peak = model.flops_per_token(), peak_flops()
    print(f"device: {DEVICE.type} | preset: {PRESET} | params: {model.num_params():,} | "
          f"budget: {TIME_BUDGET:g}s | grad accumulation: {grad_accum_steps} | data: {fingerprint}")

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", seed=SEED, device=DEVICE)
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
            x, y, epoch = next(train_loader)
        progress = min(training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(step)
            if group.get("matrix"):
                group["weight_decay"] = get_weight_decay(progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)
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
    print("---")
    width = max(len(key) for key in summary) + 2
    for key, value in summary.items():
        print(f"{key + ':':<{width}}{value}")


if __name__ == "__main__":
    main()
