"""DeepNested on any module, for the tests: MuonAdamW's groups by role from module types, with one base LR.

train.py builds its GPT's groups with `param_groups(model)`; the toy models of the tests have no such function,
so this helper groups them the way the original optimizer's `DeepNestedOptimizer(model, base_lr=...)` did.
"""

from __future__ import annotations

import torch.nn as nn

import train


def role_param_groups(model, base_lr=3e-4, weight_decay=train.WEIGHT_DECAY):
    """
    MuonAdamW groups by role: 2-D nn.Linear weights are hidden matrices (Muon), except an unembedding
    (out_features = some nn.Embedding's num_embeddings); embeddings and every other parameter (0-/1-D ones
    included) go to AdamW. Muon's LR is scaled to AdamW's update RMS, so one base_lr serves both.
    """
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab, embedding_ids = {m.num_embeddings for m in embeddings}, {id(m.weight) for m in embeddings}
    hidden_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)
                  and m.out_features not in vocab and id(m.weight) not in embedding_ids}
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if id(p) in hidden_ids]
    groups = [dict(kind="adamw", params=[p for p in params if id(p) not in hidden_ids], lr=base_lr,
                   betas=train.ADAM_BETAS, eps=1e-10, weight_decay=0.0)]
    for rows, cols in sorted({p.shape for p in hidden}):
        # Muon's update has RMS ~ 1 / sqrt(max(rows, cols)) after MuonAdamW's sqrt(rows / cols) scaling; AdamW's ~ 0.2
        lr = 0.2 * base_lr * max(rows, cols) ** 0.5 / max(1.0, rows / cols) ** 0.5
        groups.append(dict(kind="muon", params=[p for p in hidden if p.shape == (rows, cols)], lr=lr,
                           momentum=train.MUON_MOMENTUM_END, ns_steps=train.MUON_NS_STEPS, beta2=train.MUON_BETA2,
                           weight_decay=weight_decay, matrix=True))
    return [g for g in groups if g["params"]]


def deep_nested(model, base_lr=3e-4, weight_decay=train.WEIGHT_DECAY, **options):
    """train.DeepNestedOptimizer on the role groups of any module; options: its constructor's."""
    return train.DeepNestedOptimizer(model, role_param_groups(model, base_lr, weight_decay), **options)
