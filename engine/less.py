"""LESS (Xia et al., ICML 2024): pool rows whose Adam-preconditioned LoRA gradients align with the
target's gradients. Spec: ../shared/specs/less.md; read from princeton-nlp/LESS's code.

Per warm-up checkpoint i (the LoRA weights and AdamW's moments m_i, v_i at the end of epoch i):

    pool row z     g = grad of the mean token cross-entropy wrt the LoRA weights (eval mode)
                   Gamma_i(z) = m' / sqrt(v' + eps),  m' = b1 m_i + (1 - b1) g,
                                                      v' = b2 v_i + (1 - b2) g^2
                   (one Adam step: no bias correction, epsilon inside the root, as the code)
    target t       G_i(t) = g (plain gradient)
    both           P^T x through one seeded Rademacher projection, then unit L2 norm

    score(z) = max over subtasks s of  mean_{t in s}  sum_i w_i Gamma_i(z) . G_i(t)

with w_i the mean learning rate of epoch i, renormalised to sum 1. The per-sample gradients and
the projection are `engine.gradex.GradientModel` / `Projector` with `loss="ce"`. No Ray here.
"""

from __future__ import annotations

import numpy as np

BETAS = (0.9, 0.999)  # AdamW's defaults: the reference's trainer and the fine-tune stage
EPS = 1e-8


def adam_transform(grads: dict, moments: dict, betas=BETAS, eps: float = EPS) -> dict:
    """{name: (B, *shape)} per-sample gradients -> Gamma of the same shape: one Adam step of the
    checkpoint's moments {name: (exp_avg, exp_avg_sq)} per sample, without bias correction,
    epsilon inside the square root."""
    b1, b2 = betas
    out = {}
    for name, g in grads.items():
        m, v = moments[name]
        m = m.to(g.device, g.dtype)
        v = v.to(g.device, g.dtype)
        out[name] = (b1 * m + (1 - b1) * g) / ((b2 * v + (1 - b2) * g * g) + eps).sqrt()
    return out


def moments_by_name(named_params, optimizer) -> dict:
    """{name: (exp_avg, exp_avg_sq)} of the trainable parameters (`named_params`: (name, param)
    pairs), looked up by the parameter object in the optimiser's state."""
    out = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        state = optimizer.state.get(p)
        if not state:
            raise ValueError(f"{name}: the optimiser has no moments for it (no step taken?)")
        out[name] = (state["exp_avg"].detach().cpu(), state["exp_avg_sq"].detach().cpu())
    return out


def moments_from_state_dict(state_dict: dict, names: list[str]) -> dict:
    """The same from an optimiser `state_dict()`, whose state is keyed by index: the index is the
    position in the param groups, i.e. the order the trainable parameters were given in (`names`).
    Shapes are not checked here (`check_moments` does)."""
    indices = [i for group in state_dict["param_groups"] for i in group["params"]]
    if len(indices) != len(names):
        raise ValueError(f"the optimiser has {len(indices)} parameters, the model {len(names)}")
    state = state_dict["state"]
    pairs = zip(names, indices, strict=True)
    return {n: (state[i]["exp_avg"], state[i]["exp_avg_sq"]) for n, i in pairs}


def check_moments(moments: dict, shapes: dict) -> None:
    """Every adapter weight has moments of its own shape (a mis-mapped index fails here)."""
    if set(moments) != set(shapes):
        missing = sorted(set(shapes) ^ set(moments))[:3]
        raise ValueError(f"moments and adapter weights differ: {missing}")
    for name, (m, v) in moments.items():
        if tuple(m.shape) != tuple(shapes[name]) or tuple(v.shape) != tuple(shapes[name]):
            raise ValueError(f"{name}: moments of shape {tuple(m.shape)}, weight {shapes[name]}")


def read_state(raw: bytes) -> dict:
    """An epoch state file's content (`jobs.finetune.save_epoch_state`: weights, moments by
    parameter name, step), on the CPU."""
    import io

    import torch

    return torch.load(io.BytesIO(raw), map_location="cpu")


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def epoch_learning_rates(per_epoch: int, total: int, warmup: int, peak: float) -> list[float]:
    """The mean learning rate of each epoch's optimiser steps under the fine-tune stage's
    schedule (`lm.lr_factor`)."""
    from raysift.engine.lm import lr_factor

    out = []
    for start in range(0, total, per_epoch):
        steps = range(start, min(start + per_epoch, total))
        out.append(peak * float(np.mean([lr_factor(s, total, warmup) for s in steps])))
    return out


def checkpoint_weights(learning_rates: list[float]) -> np.ndarray:
    """w_i: the epochs' mean learning rates renormalised to sum 1."""
    lr = np.asarray(learning_rates, np.float64)
    if lr.ndim != 1 or not len(lr) or (lr < 0).any() or lr.sum() <= 0:
        raise ValueError(f"checkpoint weights need non-negative rates, not all 0: {lr.tolist()}")
    return lr / lr.sum()


def subtask_codes(labels) -> tuple[np.ndarray, list[str]]:
    """Each target's subtask as an integer code, and the subtask names (sorted)."""
    names, codes = np.unique(np.asarray([str(x) for x in labels]), return_inverse=True)
    return codes.astype(np.int64), names.tolist()


def scores(
    features: np.ndarray, targets: np.ndarray, weights: np.ndarray, groups: np.ndarray | None
) -> np.ndarray:
    """The LESS score of each pool row.

    features (n, C, k): each row's normalised Gamma per checkpoint; targets (m, C, k): each
    target's normalised gradient per checkpoint; weights (C,); groups (m,) subtask codes (None:
    one subtask). Groups may differ in size: the mean is per group."""
    features = np.asarray(features, np.float32)
    targets = np.asarray(targets, np.float32)
    n, C, _ = features.shape
    sim = np.zeros((n, targets.shape[0]))
    for i in range(C):
        sim += weights[i] * (features[:, i] @ targets[:, i].T).astype(np.float64)
    if groups is None or not len(groups):
        return sim.mean(axis=1)
    groups = np.asarray(groups, np.int64)
    per = np.stack([sim[:, groups == g].mean(axis=1) for g in np.unique(groups)], axis=1)
    return per.max(axis=1)
