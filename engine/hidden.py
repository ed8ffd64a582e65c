"""RDS+'s representation (Ivison et al. 2025): a causal LM's own final-layer hidden states,
position-weighted and pooled, L2-normalised.

For a row rendered as the fine-tune sees it (`engine.lm`: its tokens, the end token included) with
real tokens 1..T and final-layer hidden states h_1 .. h_T (before the LM head),

    r = sum_t w_t h_t,   w_t = t / (1 + 2 + ... + T),   representation = r / |r|

(SGPT's weighted mean: later tokens have seen more of the row). Padding never enters: t counts the
real tokens only, so a batch of any size gives the batch-1 vector (the reference's batched code
weights the padded positions too -- a defect at batch size > 1 that this does not reproduce).
Cosine similarity between rows is then a plain inner product.

Ray-free: the representation actors (`actors.features.HiddenStates`) and `raysift.select`'s
in-process path call `represent`.

References:
    Ivison, Zhang, Wang, Groeneveld, Smith, Wang, Hajishirzi, Dasigi. Large-Scale Data Selection
    for Instruction Tuning (RDS+). arXiv 2503.01807, 2025.
    Muennighoff. SGPT: GPT Sentence Embeddings for Semantic Search. arXiv 2202.08904, 2022.
"""

from __future__ import annotations

import numpy as np
import torch

from raysift.engine.lm import Example, autocast, collate


def position_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> (B, T) weights t / sum(1..T) on the real tokens, 0 on padding."""
    positions = torch.cumsum(mask, dim=1) * mask
    return positions / positions.sum(dim=1, keepdim=True).clamp(min=1)


def _final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    try:  # only the last position's logits: the LM head's (T x vocab) product is not needed
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1)  # fmt: skip
    except TypeError:  # a model whose forward has no logits_to_keep
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True)  # fmt: skip
    return out.hidden_states[-1]


@torch.inference_mode()
def represent(
    model,
    examples: list[Example],
    pad_id: int,
    *,
    batch_size: int = 16,
    precision: str = "fp32",
) -> np.ndarray:
    """The representation of each example (its token ids; labels unused): (n, d) float32, unit
    L2 norm, in input order. Batched by length (dynamic padding, right-padded)."""
    model.eval()
    device = next(model.parameters()).device
    d = int(model.config.hidden_size)
    out = np.empty((len(examples), d), dtype=np.float32)
    order = np.argsort([-len(e.input_ids) for e in examples], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows], pad_id).items()}
        with autocast(device, precision):
            hidden = _final_hidden(model, batch)
        w = position_weights(batch["attention_mask"]).to(torch.float32)
        pooled = (hidden.to(torch.float32) * w.unsqueeze(-1)).sum(dim=1)
        out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
    return out
