"""raysift: select the candidate rows that will most help a target task, on Ray.

The Python API (`raysift.api`):

```python
import raysift

candidates = ["a cat sat on the mat", "dogs bark loudly", "def add(a, b): return a + b"]
result = raysift.select(candidates, ["a kitten"], method="knn", budget=1)
result.table                      # pyarrow Table: selection.parquet's columns
raysift.methods()                 # the selection methods and what each needs
run_dir = raysift.run("configs/demo.yaml", overrides=["candidates.limit=300"])
run = raysift.open_run(run_dir)   # selection, manifest, evaluation of a run folder
```

Import names: `raysift.engine` (the math, no Ray), `raysift.actors` (Ray actors and tasks),
`raysift.jobs` (stages, pipelines, the CLI). In a checkout they are the top-level folders
engine/, actors/ and jobs/; an installed wheel has them inside this package.
"""

from __future__ import annotations

from pathlib import Path as _Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what a type checker sees of the names __getattr__ imports on first use
    from raysift.api import Result, Run, evaluate, methods, open_run, representations, run, select

__version__ = "0.1.0"

# A checkout keeps engine/, actors/, jobs/, configs/ and demo/ beside this folder and links to them
# from it (raysift/engine -> ../engine: what type checkers and IDEs read); the wheel puts them
# inside it (setuptools' package-dir mapping). Where the links are missing (a job's uploaded
# working_dir leaves them out: Ray would follow them and send every file twice), searching the
# checkout's root for submodules makes `raysift.engine` the checkout's engine/ all the same.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "jobs").is_dir() and (_checkout / "jobs" / "cli.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - a package's own __path__

_API = ("select", "run", "evaluate", "open_run", "methods", "representations", "Result", "Run")


def __getattr__(name: str):
    # The API imports on first use: `import raysift` stays cheap and starts nothing.
    if name in _API:
        from raysift import api

        return getattr(api, name)
    raise AttributeError(f"module 'raysift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", "select", "run", "evaluate", "open_run", "methods", "representations",
           "Result", "Run"]  # fmt: skip
