"""GradEx (Li et al., EMNLP Findings 2024): estimate what fine-tuning on a subset S of data sources
does to the target loss from gradients at a multitask meta-initialisation theta*, without training.

Per training sample i (rows of every source) and per target token (j, t), at theta*:

    f_i   = mean over the sample's labelled tokens of logit(p_t),
            logit(p) = z_y - logsumexp_{v!=y} z_v
    G_i   = P^T grad f_i                 P: d x k Rademacher / sqrt(k), generated block by block
    f0_jt, G_jt for the target's evaluation tokens, the same way

A token's cross-entropy is softplus(-logit) exactly, so fine-tuning linearises into a logistic
regression in k dims (delta = P w):

    offset          w_S = argmin_w mean_{i in S} softplus(-(f_i + G_i.w)) + lam/2 |w|^2   (Newton)
    reference       the paper code's logistic regression on sign-flipped gradients (liblinear's
                    objective, C = 1e-4, labels ~ Bernoulli(0.7), first 80% of rows), then delta
                    rescaled to scale * |theta*_LoRA|
    reference_fast  the small-C limit of `reference`: w = sum of the subset's G (per-source sums,
                    one matrix product for every subset), same rescale
    L_hat(S) = mean_jt softplus(-(f0_jt + c G_jt.w_S))     (`functional`: evaluate theta* + P w)

Everything here is numpy/torch without Ray: the jobs spread subsets over Ray tasks and gradients
over Ray Data actors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

ESTIMATORS = ("offset", "reference", "reference_fast", "functional")
LOSSES = ("logit", "ce")  # what a per-sample gradient differentiates: GradEx's, LESS's


# -- the per-token output -------------------------------------------------------------------------


def token_logits(z, y, clip: float | None = None):
    """logit(p_y) of each row of logits `z` (..., V) at gold tokens `y` (...), in the stable form
    z_y - logsumexp_{v != y} z_v. `clip` (parity with the reference code) clips p to
    [clip, 1 - clip] and takes log(p / (1 - p)) instead."""
    import torch

    zy = z.gather(-1, y[..., None])[..., 0]
    if clip is None:
        others = z.scatter(-1, y[..., None], float("-inf")).logsumexp(-1)
        return zy - others
    p = torch.exp(zy - z.logsumexp(-1)).clamp(clip, 1 - clip)
    return torch.log(p) - torch.log1p(-p)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# -- the projection -------------------------------------------------------------------------------


def block_seed(seed: int, name: str) -> int:
    """The seed of one parameter's block of P: from the run seed and the parameter's name, so a
    block is the same whatever the order or subset of parameters it is generated with."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Projector:
    """P (d x k, entries +-1/sqrt(k)) as one block per trainable tensor, generated on demand from
    (seed, name): P^T g for stacked per-sample gradients, P w back in parameter shapes. The whole
    P never exists at once; the largest block is one tensor's numel x k."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], k: int, seed: int):
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        self.shapes = dict(sorted(shapes.items()))
        self.k = k
        self.seed = seed

    @property
    def d(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def block(self, name: str):
        """One parameter's rows of P (numel x k float32): random bytes from (seed, name), one
        sign per bit (numpy's PCG64 bytes + unpackbits: ~4x faster than drawing int8 signs, and
        what a call spends before its matrix product)."""
        import torch

        n = math.prod(self.shapes[name])
        raw = np.random.default_rng(block_seed(self.seed, name)).bytes(-(-n * self.k // 8))
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=n * self.k).reshape(n, self.k)
        scale = torch.tensor(1.0 / math.sqrt(self.k))
        return torch.where(torch.from_numpy(bits).bool(), scale, -scale)

    def project(self, grads: dict) -> np.ndarray:
        """{name: (B, *shape)} per-sample gradients -> (B, k) float32, P^T g for each row."""
        parts = []
        for name in self.shapes:
            g = grads[name]  # on any device: the block goes there (generated on the CPU)
            parts.append(g.reshape(g.shape[0], -1).float() @ self.block(name).to(g.device))
        return sum(parts[1:], parts[0]).cpu().numpy()

    def lift(self, w: np.ndarray) -> dict:
        """P w as {name: tensor of the parameter's shape}."""
        import torch

        wt = torch.as_tensor(np.asarray(w, np.float32))
        return {name: (self.block(name) @ wt).reshape(s) for name, s in self.shapes.items()}

    def gram(self) -> np.ndarray:
        """P^T P (k x k, float64), for |P w|^2 = w^T (P^T P) w without lifting w."""
        out = np.zeros((self.k, self.k))
        for name in self.shapes:
            b = self.block(name).double()
            out += (b.T @ b).numpy()
        return out

    def dense(self) -> np.ndarray:
        """The whole P (d x k): tests and small models only."""
        return np.concatenate([self.block(n).numpy() for n in self.shapes])


# -- per-sample and per-token gradients (torch.func) ----------------------------------------------


class GradientModel:
    """A causal LM with LoRA adapters at theta*, as a function of its adapter weights: per-sample
    mean logits (GradEx) or mean cross-entropies (LESS) and their gradients (torch.func.vmap(grad)),
    projected or not, per-token logits and their projected gradients (torch.func.jacrev,
    chunked), and the loss at theta* + P w."""

    def __init__(
        self,
        model,
        projector: Projector,
        *,
        chunk: int = 8,
        clip: float | None = None,
        loss: str = "logit",
    ):
        """`loss`: what a sample's gradient differentiates -- "logit", the mean gold-token logit
        (GradEx), or "ce", the mean token cross-entropy (LESS: HF's `.loss`)."""
        import torch

        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        self.model = model.eval()  # no dropout: f and its gradient are deterministic
        self.params = {n: p.detach() for n, p in model.named_parameters() if n in projector.shapes}
        if set(self.params) != set(projector.shapes):
            raise ValueError("the projector's parameters are not the model's adapter weights")
        self.frozen = {
            n: p.detach() for n, p in model.named_parameters() if n not in projector.shapes
        }
        self.buffers = dict(model.named_buffers())
        self.projector = projector
        self.chunk = chunk
        self.clip = clip
        self.device = next(model.parameters()).device
        self._torch = torch

    @staticmethod
    def adapter_shapes(model) -> dict[str, tuple[int, ...]]:
        """The LoRA weights of a peft model (by name: `lora_`), whatever their requires_grad."""
        return {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}

    def _logits(self, params, ids):
        from torch.func import functional_call

        out = functional_call(
            self.model, ({**self.frozen, **params}, self.buffers), args=(),
            kwargs={"input_ids": ids[None]},
        )  # fmt: skip
        return out.logits[0].float()

    def _token_logits(self, params, ids, labels):
        """logit(p) of every next token of one right-padded sequence (causal attention: the
        padding after a token never changes it, so no attention mask is needed)."""
        z = self._logits(params, ids)[:-1]
        return token_logits(z, labels[1:].clamp(min=0), self.clip)

    def _sample_value(self, params, ids, labels):
        """The sample's mean over its scored next tokens of the gold-token logit ("logit") or of
        the cross-entropy ("ce")."""
        scored = (labels[1:] >= 0).float()
        if self.loss == "logit":
            per_token = self._token_logits(params, ids, labels)
        else:
            z = self._logits(params, ids)[:-1]
            y = labels[1:].clamp(min=0)
            per_token = z.logsumexp(-1) - z.gather(-1, y[:, None])[:, 0]
        return (per_token * scored).sum() / scored.sum().clamp(min=1)

    def set_adapter(self, weights: dict) -> None:
        """Load adapter weights {name: tensor} (a checkpoint) in place: every later gradient is
        taken there."""
        if set(weights) != set(self.params):
            raise ValueError("the weights are not this model's adapter weights")
        with self._torch.no_grad():
            for name, value in weights.items():
                self.params[name].copy_(value.to(self.params[name].device))

    def sample_gradients(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        """(f0 (B,), G (B, k)) for a collated batch: per-sample value (`loss`) and P^T its
        gradient. Gradients are vmapped `chunk` samples at a time and projected once for the
        whole batch (P's blocks are generated once per call)."""
        f0, grads = self.sample_grads(batch, on_device=True)
        return f0, self.projector.project(grads)

    def sample_grads(self, batch: dict, on_device: bool = False) -> tuple[np.ndarray, dict]:
        """(f0 (B,), {name: (B, *shape)}): per-sample values and their unprojected gradients, on
        the CPU (or left on the model's device: `on_device`). The samples are vmapped `chunk` at
        a time in order of length, each chunk cut to its longest sample: padding costs compute
        (a shuffled batch of mixed lengths pads most samples to the longest); the results come
        back in the batch's order."""
        from torch.func import grad, vmap

        torch = self._torch

        def value_and_aux(params, ids, labels):
            value = self._sample_value(params, ids, labels)
            return value, value.detach()

        per_sample = vmap(grad(value_and_aux, has_aux=True), in_dims=(None, 0, 0))
        scored_at = batch["labels"] >= 0
        last = torch.where(scored_at.any(1), scored_at.int().cumsum(1).argmax(1), 0)
        order = torch.argsort(last, stable=True)
        f_all, g_all = [], []
        for start in range(0, len(order), self.chunk):
            rows = order[start : start + self.chunk]
            width = max(2, int(last[rows].max()) + 1)
            ids = batch["input_ids"][rows, :width].to(self.device)
            labels = batch["labels"][rows, :width].to(self.device)
            grads, f0 = per_sample(self.params, ids, labels)
            f_all.append(f0.cpu())
            g_all.append({n: v.detach() if on_device else v.detach().cpu()
                          for n, v in grads.items()})  # fmt: skip
        back = torch.argsort(order)
        stacked = {n: torch.cat([g[n] for g in g_all])[back.to(g_all[0][n].device)]
                   for n in self.projector.shapes}  # fmt: skip
        return torch.cat(f_all)[back].numpy(), stacked

    def token_gradients(self, examples: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(f0 (T,), G (T, k))] per sequence (an `Example`): every scored next token's logit and
        P^T its gradient — one forward pass per sequence, its T backward passes vmapped `chunk`
        at a time; the projection runs once for all the sequences' tokens."""
        from torch.func import jacrev

        torch = self._torch
        f_all, g_all, sizes = [], [], []
        for ex in examples:
            ids = torch.as_tensor(ex.input_ids, device=self.device)
            labels = torch.as_tensor(ex.labels, device=self.device)
            keep = (labels[1:] >= 0).cpu()

            def fn(params, ids=ids, labels=labels):
                out = self._token_logits(params, ids, labels)
                return out, out.detach()

            jac, f0 = jacrev(fn, has_aux=True, chunk_size=self.chunk)(self.params)
            f_all.append(f0.cpu()[keep])
            g_all.append({n: v.detach().cpu()[keep] for n, v in jac.items()})
            sizes.append(int(keep.sum()))
        stacked = {n: torch.cat([g[n] for g in g_all]) for n in self.projector.shapes}
        G = self.projector.project(stacked)
        bounds = np.cumsum([0, *sizes])
        return [(f.numpy(), G[a:b]) for f, a, b in zip(f_all, bounds[:-1], bounds[1:], strict=True)]

    def loss_at(self, w: np.ndarray | None, batches: list[dict]) -> float:
        """Mean token cross-entropy over `batches` with adapter weights theta* + P w (w None:
        theta* itself) — the functional estimate."""
        torch = self._torch
        params = dict(self.params)
        if w is not None:
            delta = self.projector.lift(w)
            params = {n: p + delta[n].to(p.device) for n, p in params.items()}
        total, count = 0.0, 0
        from torch.func import functional_call

        with torch.no_grad():
            for b in batches:
                ids = b["input_ids"].to(self.device)
                out = functional_call(
                    self.model, ({**self.frozen, **params}, self.buffers), args=(),
                    kwargs={"input_ids": ids, "attention_mask": b["attention_mask"].to(ids.device)},
                )  # fmt: skip
                z = out.logits[:, :-1].float()
                y = b["labels"][:, 1:].to(self.device)
                nll = torch.nn.functional.cross_entropy(
                    z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum"
                )
                total += float(nll)
                count += int((y >= 0).sum())
        return total / max(count, 1)

    def adapter_norm(self) -> float:
        return float(math.sqrt(sum(float((p.double() ** 2).sum()) for p in self.params.values())))


# -- estimators (numpy) ---------------------------------------------------------------------------


@dataclass
class SourceGradients:
    """The training side: per-sample f0 (n,), G (n, k), and each sample's source index."""

    f0: np.ndarray
    G: np.ndarray
    source: np.ndarray
    names: list[str]

    def __post_init__(self):
        self.f0 = np.asarray(self.f0, np.float64)
        self.G = np.asarray(self.G, np.float64)
        self.source = np.asarray(self.source, np.int64)

    @property
    def n_sources(self) -> int:
        return len(self.names)

    def rows_of(self, subset: np.ndarray) -> np.ndarray:
        """Boolean row mask of the samples whose source is in `subset` (a 0/1 mask over sources)."""
        return np.asarray(subset, bool)[self.source]

    def sums(self) -> np.ndarray:
        """(n_sources, k): the sum of each source's projected gradients."""
        out = np.zeros((self.n_sources, self.G.shape[1]))
        np.add.at(out, self.source, self.G)
        return out


@dataclass
class TargetGradients:
    """The target side: f0 and G of every scored evaluation token, flattened (m,), (m, k)."""

    f0: np.ndarray
    G: np.ndarray

    def __post_init__(self):
        self.f0 = np.asarray(self.f0, np.float64)
        self.G = np.asarray(self.G, np.float64)

    def loss(self, W: np.ndarray, c: float = 1.0) -> np.ndarray:
        """L_hat for each row of W (s, k): mean softplus(-(f0 + c G w)) over the tokens."""
        W = np.atleast_2d(W)
        Z = self.f0[:, None] + c * (self.G @ W.T)
        return softplus(-Z).mean(axis=0)

    def base_loss(self) -> float:
        """The target loss at theta* itself (the 'loss at theta*' trivial predictor)."""
        return float(softplus(-self.f0).mean())


def fit_offset(
    f0: np.ndarray, G: np.ndarray, lam: float, *, tol: float = 1e-10, max_iter: int = 50
) -> np.ndarray:
    """argmin_w mean softplus(-(f0 + G w)) + lam/2 |w|^2, by Newton's method with backtracking
    (strictly convex for lam > 0)."""
    n, k = G.shape
    w = np.zeros(k)

    def objective(w):
        return softplus(-(f0 + G @ w)).mean() + 0.5 * lam * w @ w

    value = objective(w)
    for _ in range(max_iter):
        z = f0 + G @ w
        s = sigmoid(-z)
        grad = -(G.T @ s) / n + lam * w
        if np.abs(grad).max() < tol:
            break
        h = s * (1 - s)
        H = (G.T * h) @ G / n + lam * np.eye(k)
        step = np.linalg.solve(H, grad)
        t = 1.0
        while t > 1e-8:
            cand = w - t * step
            new = objective(cand)
            if new <= value - 1e-4 * t * grad @ step:
                break
            t *= 0.5
        w, value = cand, new
    return w


def offset_weights(grads: SourceGradients, subsets: np.ndarray, lam: float) -> np.ndarray:
    """w_S (s, k) of the offset estimator for each 0/1 row of `subsets` (s, n_sources)."""
    out = np.zeros((len(subsets), grads.G.shape[1]))
    for i, subset in enumerate(subsets):
        rows = grads.rows_of(subset)
        out[i] = fit_offset(grads.f0[rows], grads.G[rows], lam)
    return out


def fit_liblinear_lr(X: np.ndarray, y: np.ndarray, C: float, *, max_iter: int = 100) -> np.ndarray:
    """The optimum of liblinear's L2 logistic regression with an intercept (sklearn's
    LogisticRegression(penalty='l2', solver='liblinear'), intercept_scaling 1): the intercept is a
    constant feature and is regularised too,

        min_b 1/2 |b|^2 + C sum_i log(1 + exp(-y_i b.[x_i, 1])),  y in {-1, +1}.

    Returns b (k + 1,), the last entry the intercept. Newton's method: exact, not liblinear's
    approximate stop."""
    Xb = np.hstack([X, np.ones((len(X), 1))])
    ys = np.where(y > 0, 1.0, -1.0)
    b = np.zeros(Xb.shape[1])
    for _ in range(max_iter):
        m = ys * (Xb @ b)
        s = sigmoid(-m)
        grad = b - C * Xb.T @ (ys * s)
        if np.abs(grad).max() < 1e-12:
            break
        H = np.eye(len(b)) + C * (Xb.T * (s * (1 - s))) @ Xb
        b = b - np.linalg.solve(H, grad)
    return b


def reference_weights(
    grads: SourceGradients,
    subsets: np.ndarray,
    *,
    C: float = 1e-4,
    label_p: float = 0.7,
    train_fraction: float = 0.8,
    seed: int = 0,
) -> np.ndarray:
    """w (s, k) of the paper code's estimator for each subset: Bernoulli(label_p) labels (seeded per
    subset, where the reference was unseeded), rows labelled 0 negated, the liblinear regression on
    the first `train_fraction` of the rows, w = its coefficients (the intercept dropped)."""
    out = np.zeros((len(subsets), grads.G.shape[1]))
    for i, subset in enumerate(subsets):
        X = grads.G[grads.rows_of(subset)]
        rng = np.random.default_rng([seed, i])
        y = rng.binomial(1, label_p, size=len(X))
        X = np.where(y[:, None] == 1, X, -X)
        n_train = int(len(X) * train_fraction)
        out[i] = fit_liblinear_lr(X[:n_train], y[:n_train], C)[:-1]
    return out


def reference_fast_weights(grads: SourceGradients, subsets: np.ndarray) -> np.ndarray:
    """The small-C limit of `reference_weights`: w = sum of the subset's G, for every subset at
    once (subsets (s, n_sources) @ per-source sums (n_sources, k))."""
    return np.asarray(subsets, np.float64) @ grads.sums()


def rescale(W: np.ndarray, gram: np.ndarray, norm: float) -> np.ndarray:
    """Scale each w so that |P w| = norm (the reference's fixed-norm delta), using
    |P w|^2 = w^T P^T P w."""
    lengths = np.sqrt(np.einsum("sk,kl,sl->s", W, gram, W))
    return W * (norm / np.where(lengths > 0, lengths, 1.0))[:, None]


# -- subsets and selection ------------------------------------------------------------------------


def sample_subsets(n_sources: int, m: int, size: int, seed: int) -> np.ndarray:
    """m distinct random subsets of `size` sources as 0/1 rows (m, n_sources), seeded; fewer when
    there are fewer distinct subsets than m."""
    if not 1 <= size <= n_sources:
        raise ValueError(f"subset size must be in [1, {n_sources}], got {size}")
    most = math.comb(n_sources, size)
    m = min(m, most)
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    rows: list[np.ndarray] = []
    while len(rows) < m:
        row = np.zeros(n_sources, np.int8)
        row[rng.choice(n_sources, size, replace=False)] = 1
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return np.array(rows, np.int8).reshape(-1, n_sources)


def ensemble_scores(subsets: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Random-ensemble score of each source: mean L_hat over the subsets that contain it (lower
    is better); NaN for a source in no subset."""
    subsets = np.asarray(subsets, np.float64)
    counts = subsets.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (subsets * losses[:, None]).sum(axis=0) / counts


def surrogate(subsets: np.ndarray, losses: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares fit L_hat(S) ~ b + sum_{i in S} theta_i: (b, theta (n_sources,)).

    When every subset has the same size (the sampled ones do), b and the mean of theta cannot be
    told apart: theta is returned centred (mean 0, b absorbs the rest), so theta_i < 0 reads
    "better than the average source"."""
    X = np.asarray(subsets, np.float64)
    sizes = X.sum(axis=1)
    coef, *_ = np.linalg.lstsq(np.hstack([np.ones((len(X), 1)), X]), losses, rcond=None)
    b, theta = float(coef[0]), coef[1:]
    if np.all(sizes == sizes[0]):
        shift = theta.mean()
        theta, b = theta - shift, b + shift * sizes[0]
    return b, theta


def forward_selection(order: np.ndarray, estimate) -> tuple[np.ndarray, list[float]]:
    """Single pass over sources in `order` (best first): add a source when the estimated loss of
    the set with it is lower than without. `estimate(mask) -> L_hat`. Returns (mask, trace)."""
    n = len(order)
    mask = np.zeros(n, np.int8)
    mask[order[0]] = 1
    best = estimate(mask)
    trace = [best]
    for i in order[1:]:
        trial = mask.copy()
        trial[i] = 1
        value = estimate(trial)
        if value < best:
            mask, best = trial, value
        trace.append(best)
    return mask, trace


@dataclass
class Validation:
    """Estimated vs real target losses over fine-tuned subsets, and the trivial predictors."""

    estimated: np.ndarray
    real: np.ndarray
    base_loss: float
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        real = np.asarray(self.real, np.float64)
        est = np.asarray(self.estimated, np.float64)
        const = np.full_like(real, real.mean())  # the best constant, in hindsight
        at_theta = np.full_like(real, self.base_loss)
        return {
            "subsets": len(real),
            "estimator": _agreement(est, real),
            "constant": _agreement(const, real),
            "loss_at_theta_star": _agreement(at_theta, real),
        }


def _agreement(pred: np.ndarray, real: np.ndarray) -> dict:
    return {
        "spearman": spearman(pred, real),
        "pearson": pearson(pred, real),
        "mean_relative_error": float(np.mean(np.abs(pred - real) / np.abs(real))),
    }


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return None  # a constant has no correlation
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    return pearson(_ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64)))
