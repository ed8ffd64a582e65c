"""Loading models quietly: no progress bars or loading notes from transformers, peft or the GGUF
reader on a healthy run, unless the user asked for them (`--verbose`, `RAYSIFT_VERBOSE=1`).

transformers draws its "Loading weights" bar through its own switch (`utils.logging`), which the
caller's settings may have on; the GGUF reader draws "Converting and de-quantizing GGUF tensors"
with tqdm directly, which no switch reaches, so its module's `tqdm` is swapped for a silent one
while a model loads. Both are put back afterwards: a notebook that wants its own bars keeps them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any

VERBOSE = "RAYSIFT_VERBOSE"


def verbose() -> bool:
    """True when the user asked to see the libraries' own output."""
    return os.environ.get(VERBOSE, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """While a model loads: transformers' progress bars and notes off, the GGUF reader's bar
    silenced; everything restored on the way out."""
    if verbose():
        yield
        return
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf: Any = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf is None:
        with contextlib.suppress(ImportError):  # no gguf package: nothing draws that bar
            import transformers.modeling_gguf_pytorch_utils as gguf
    drawn = getattr(gguf, "tqdm", None)
    if drawn is not None:
        gguf.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        if drawn is not None:
            gguf.tqdm = drawn
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
