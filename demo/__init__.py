"""The demo shipped inside the package: 5,897 real texts from six sources (the pool), 200 Debian
"science" package descriptions (the targets) and 100 more (held out). README.md beside this file
says where they come from; `build_demo.py` made them.

`load` hands them over as a notebook holds data, so that every example in the docs runs as
written:

```python
from raysift.demo import load

demo = load(rows=500)
demo.pool          # pandas DataFrame: id, source, label, text (the first 500 rows)
demo.texts, demo.ids, demo.targets, demo.heldout
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pandas as pd

FOLDER = Path(str(files(__name__)))
POOL = FOLDER / "pool.parquet"
TARGETS = FOLDER / "targets.jsonl"
HELDOUT = FOLDER / "heldout.jsonl"


@dataclass(frozen=True)
class Demo:
    pool: pd.DataFrame  # id, source, label, text
    targets: list[str]  # target texts
    heldout: list[str]  # held-out target texts (never selected on)

    @property
    def texts(self) -> list[str]:
        return self.pool["text"].tolist()

    @property
    def ids(self) -> list[str]:
        return self.pool["id"].tolist()


def _texts(path: Path, limit: int | None) -> list[str]:
    lines = path.read_text().splitlines()[:limit]
    return [json.loads(line)["text"] for line in lines]


def load(rows: int | None = None, targets: int | None = None, heldout: int | None = None) -> Demo:
    """The demo's pool (its first `rows` rows), targets and held-out texts (the first
    `targets` / `heldout` of each); None = all."""
    pool = pd.read_parquet(POOL)
    if rows is not None:
        pool = pool.head(rows).reset_index(drop=True)
    return Demo(pool, _texts(TARGETS, targets), _texts(HELDOUT, heldout))
