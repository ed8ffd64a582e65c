"""Entropic optimal transport between targets and candidates: log-domain Sinkhorn, sharded.

Problem (GOT-D's reference configuration, ott-jax 0.4.4): rows = targets y_1..y_m with weights
a_i = 1/m, columns = candidates x_1..x_N with b_j = 1/N (N = the whole pool, also when it is
sharded), cost C_ij = ||y_i||^2 + ||x_j||^2 - 2 <y_i, x_j> (float32), absolute epsilon, plan
P_ij = exp((f_i + g_j - C_ij) / eps). The iteration, as ott-jax 0.4.4 runs it with momentum w:

    g_hat = eps log b - (eps LSE_i((f_i + g_j - C_ij)/eps) - g_j);   g = (1 - w) g + w g_hat
    f_hat = eps log a - (eps LSE_j((f_i + g_j - C_ij)/eps) - f_i);   f = (1 - w) f + w f_hat
    err = sum_j | sum_i exp((f_i + g_j - C_ij)/eps) - b_j |;         stop when err < threshold

Fused (two passes over C per iteration instead of three): the error pass's column LSE, taken with
the new f and g, is exactly the next iteration's g-update LSE, so one column pass serves both.
Same iterates (the error is exp of that LSE rather than a sum of exps: ~1e-7 apart).

Sharding (exact, the spec's coordinator design): each `SinkhornShard` holds a block of candidates
and its part of g; the coordinator holds f. Per iteration a shard sends its row partials
r_k[i] = LSE_{j in shard}((f_i + g_j - C_ij)/eps) (m floats) and, after the broadcast of the new
f, its error share e_k (1 float). LSE_k r_k is the full row LSE, so any shard count gives the same
iterates up to float rounding. `solve` is the same loop over one in-process shard.

Memory: a shard caches its m x n_k float32 cost block when it fits `cache_bytes`, else recomputes
it in column blocks of `block` candidates each pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raysift.engine.allocator import large_allocations_via_mmap
from raysift.engine.fanout import Fanout, local_fanout
from raysift.engine.params import SinkhornParams

DEFAULTS = SinkhornParams()


@dataclass(frozen=True)
class SinkhornResult:
    f: np.ndarray  # (m,) float32 target potentials
    g: np.ndarray  # (N,) float32 candidate potentials (concatenated shard by shard)
    n_iter: int
    errors: np.ndarray  # (n_iter,) float32: L1 candidate-marginal error after each iteration
    converged: bool


def sqeuclidean(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """C_ij = ||y_i||^2 + ||x_j||^2 - 2 <y_i, x_j>, float32 (ott's PointCloud SqEuclidean)."""
    return (y * y).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * (y @ x.T)


class SinkhornShard:
    """A block of candidates and its potentials g; answers the coordinator's passes."""

    def __init__(
        self,
        candidates: np.ndarray,
        targets: np.ndarray,
        *,
        n_total: int,
        epsilon: float,
        offset: int = 0,
        cache_bytes: int = DEFAULTS.cache_mb << 20,
        block: int = DEFAULTS.block,
        device: str = "cpu",
    ) -> None:
        large_allocations_via_mmap()
        self.device = torch.device(device)
        self.x = torch.as_tensor(np.ascontiguousarray(candidates, np.float32), device=self.device)
        self.y = torch.as_tensor(np.ascontiguousarray(targets, np.float32), device=self.device)
        self.eps = float(epsilon)
        self.offset = int(offset)
        self.log_b = self.eps * math.log(1.0 / n_total)
        self.b = 1.0 / n_total
        n, m = len(self.x), len(self.y)
        self.block = max(1, block)
        self.cost = None
        if 4 * n * m <= cache_bytes:
            cost = torch.empty((m, n), dtype=torch.float32, device=self.device)
            for cols, c in self._blocks():  # computed block by block: no full-size temporaries
                cost[:, cols] = c
            self.cost = cost
        self.g = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.L = torch.zeros(n, dtype=torch.float32, device=self.device)

    def __len__(self) -> int:
        return len(self.x)

    def _blocks(self):
        """(column slice, cost block) pairs covering the shard. Passes run block by block even
        over a cached cost: the (f + g - C)/eps temporaries stay ~16 MB instead of the cost's
        size (measured: peak memory 1.73 -> see BENCHMARKS.md at 200k x 500)."""
        step = max(256, min(self.block, (1 << 22) // max(1, len(self.y))))
        for a in range(0, len(self.x), step):
            cols = slice(a, a + step)
            yield (
                cols,
                self.cost[:, cols] if self.cost is not None else sqeuclidean(self.y, self.x[cols]),
            )

    def columns(self, f: np.ndarray) -> float:
        """Column pass with f: L_j = eps LSE_i((f_i + g_j - C_ij)/eps) - g_j, and this shard's
        share of the L1 marginal error sum_j |exp((L_j + g_j)/eps) - b_j|."""
        f_t = torch.as_tensor(np.asarray(f, np.float32), device=self.device)
        err = 0.0
        for cols, c in self._blocks():
            g = self.g[cols]
            lse = torch.logsumexp(self._exponent(f_t, g, c), dim=0)
            self.L[cols] = self.eps * lse - g
            err += float(torch.abs(torch.exp(lse) - self.b).sum())
        return err

    def _exponent(self, f: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(f_i + g_j - C_ij) / eps, in one fresh block-sized buffer."""
        return (f[:, None] + g[None, :]).sub_(c).div_(self.eps)

    def rows(self, f: np.ndarray, w: float) -> np.ndarray:
        """Update g from the last column pass (over-relaxed), then return the row partials
        r_i = LSE_{j in shard}((f_i + g_j - C_ij)/eps) with the new g."""
        self.g = (1 - w) * self.g + w * (self.log_b - self.L)
        f_t = torch.as_tensor(np.asarray(f, np.float32), device=self.device)
        parts = [
            torch.logsumexp(self._exponent(f_t, self.g[cols], c), dim=1)
            for cols, c in self._blocks()
        ]
        r = parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), dim=0)
        return r.cpu().numpy()

    def potentials(self) -> np.ndarray:
        return self.g.cpu().numpy()

    def smallest(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's k smallest g (ascending, ties by row) and their global rows."""
        g = self.potentials()
        order = np.lexsort((np.arange(len(g)), g))[:k]
        return g[order], order + self.offset


def c_transform(shard: SinkhornShard, f: np.ndarray) -> np.ndarray:
    """g_j = eps log b - eps LSE_i((f_i - C_ij)/eps) for the shard's candidates: how a converged f
    scores candidates it was not solved with (streaming, incremental pools)."""
    f_t = torch.as_tensor(np.asarray(f, np.float32), device=shard.device)
    out = torch.empty(len(shard.x), dtype=torch.float32, device=shard.device)
    for cols, c in shard._blocks():
        out[cols] = shard.log_b - shard.eps * torch.logsumexp((f_t[:, None] - c) / shard.eps, 0)
    return out.cpu().numpy()


def coordinate(
    fanout: Fanout,
    m: int,
    *,
    epsilon: float,
    threshold: float = DEFAULTS.threshold,
    momentum: float = DEFAULTS.momentum,
    max_iterations: int = DEFAULTS.max_iterations,
    f: np.ndarray | None = None,
    on_iteration: Callable[[int, np.ndarray, float], None] | None = None,
) -> tuple[np.ndarray, int, np.ndarray, bool]:
    """The coordinator's loop over shards reached by `fanout(method, *args)`; returns
    (f, n_iter, errors, converged). The shards end holding their converged g. `on_iteration(it,
    f, err)` after each iteration (progress, tests)."""
    eps, w = float(epsilon), float(momentum)
    log_a = np.float32(eps * math.log(1.0 / m))
    f = np.zeros(m, np.float32) if f is None else np.asarray(f, np.float32)
    fanout("columns", f)  # L from the starting f and g
    errors = []
    for it in range(max_iterations):
        r = np.stack(fanout("rows", f, w))  # (shards, m)
        lse = torch.logsumexp(torch.as_tensor(r), dim=0).numpy()
        f_hat = log_a - (np.float32(eps) * lse - f)
        f = ((1 - w) * f + w * f_hat).astype(np.float32)
        err = float(np.sum(fanout("columns", f)))
        errors.append(err)
        if on_iteration:
            on_iteration(it + 1, f, err)
        if err < threshold:
            return f, it + 1, np.asarray(errors, np.float32), True
    return f, max_iterations, np.asarray(errors, np.float32), False


def solve(
    candidates: np.ndarray,
    targets: np.ndarray,
    *,
    epsilon: float = DEFAULTS.epsilon,
    threshold: float = DEFAULTS.threshold,
    momentum: float = DEFAULTS.momentum,
    max_iterations: int = DEFAULTS.max_iterations,
    cache_bytes: int = DEFAULTS.cache_mb << 20,
    block: int = DEFAULTS.block,
    device: str = "cpu",
) -> SinkhornResult:
    """Single-process solve: one shard holding every candidate, the same loop as the sharded one."""
    check_inputs(candidates, targets, epsilon)
    shard = SinkhornShard(
        candidates, targets, n_total=len(candidates), epsilon=epsilon,
        cache_bytes=cache_bytes, block=block, device=device,
    )  # fmt: skip

    f, n_iter, errors, converged = coordinate(
        local_fanout([shard]), len(targets), epsilon=epsilon, threshold=threshold,
        momentum=momentum, max_iterations=max_iterations,
    )  # fmt: skip
    return SinkhornResult(f, shard.potentials(), n_iter, errors, converged)


def check_inputs(candidates: np.ndarray, targets: np.ndarray, epsilon: float) -> None:
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if len(targets) == 0:
        raise ValueError("no targets (empty target set)")
    if len(candidates) == 0:
        raise ValueError("no candidates")
    if targets.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"targets have dimension {targets.shape[1]}, candidates {candidates.shape[1]}"
        )
    for name, x in (("targets", targets), ("candidates", candidates)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contain NaN or inf")
