"""rds: RDS+ (Ivison et al. 2025) as one method name: knn on the `lm_hidden` representation with the
round-robin aggregation (`jobs.methods.knn`, `jobs.methods.lm_hidden`, `engine.round_robin`)."""

from __future__ import annotations

from raysift.jobs.config import LmHiddenConfig
from raysift.jobs.methods import knn, lm_hidden
from raysift.jobs.methods.base import Method, all_checks

METHOD = Method(
    name="rds",
    summary="RDS+: knn on the LM's hidden states, round robin over the targets",
    select=knn.select,
    local=knn.local,
    score="cosine to the target whose turn took the row (LM hidden states)",
    needs=frozenset({"vectors"}),
    options=LmHiddenConfig,
    checks=lambda cfg: all_checks(cfg, lm_hidden.checks, knn.checks),
)
