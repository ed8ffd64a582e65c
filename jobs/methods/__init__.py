"""The method and representation tables: one record per selection method and per representation,
each complete (what differs per method lives in its entry; everything else derives from the tables).

    method        selector  representation  module
    random        random    --              methods/random.py
    knn           knn       any             methods/knn.py       (max, centroid, round_robin,
                                                                  subtask_mean_max)
    tsds          tsds      any             methods/tsds.py
    gotd          gotd      any             methods/gotd.py
    gradex        gradex    sources         methods/gradex.py
    dsir          dsir      n-grams         methods/dsir.py
    rds           knn       lm_hidden       methods/rds.py       (round_robin: RDS+)
    less          knn       less            methods/less.py      (subtask_mean_max: LESS)

    representation  computed by         module
    embedding       the embed stage     methods/embedding.py
    vectors         the embed stage     methods/vectors.py
    lm_hidden       the select stage    methods/lm_hidden.py
    less            the select stage    methods/less.py

Adding a selector or a representation: its engine module, its method module (one `select(ctx)` /
`prepare(ctx)`, its record), its tests; the config section in `jobs.config`.
"""

from __future__ import annotations

from raysift.jobs.config import VECTOR_SELECTORS
from raysift.jobs.methods import (
    dsir,
    embedding,
    gotd,
    gradex,
    knn,
    less,
    lm_hidden,
    random,
    rds,
    tsds,
    vectors,
)
from raysift.jobs.methods.base import Context, InMemory, Method, Representation

METHODS: dict[str, Method] = {
    m.name: m
    for m in (random.METHOD, knn.METHOD, tsds.METHOD, gotd.METHOD, gradex.METHOD, dsir.METHOD,
              rds.METHOD, less.METHOD)  # fmt: skip
}
REPRESENTATIONS: dict[str, Representation] = {
    r.name: r
    for r in (embedding.REPRESENTATION, vectors.REPRESENTATION, lm_hidden.REPRESENTATION,
              less.REPRESENTATION)  # fmt: skip
}
# every vector selector on every representation
PAIRS = [(s, r) for s in VECTOR_SELECTORS for r in REPRESENTATIONS]

__all__ = ["METHODS", "REPRESENTATIONS", "PAIRS", "Context", "InMemory", "Method", "Representation"]
