"""engine.hidden (RDS+'s representation): equal to the reference's pooling run at batch size 1,
whatever the batch size and padding, on the tiny test model and on SmolLM2, on texts and on
conversations rendered as the fine-tune renders them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysift.engine import hidden, lm
from raysift.engine.render import render
from tests.conftest import DEMO_TARGETS

TEXTS = ["a", "the cat sat on the mat and looked at the door for a long time",
         "def add(a, b):\n    return a + b", "science: a library for numerical computing",
         "short", "Q: what is the time?\nA: half past four"]  # fmt: skip


def reference_batch1(model, example: lm.Example) -> np.ndarray:
    """minimal_multitask/compute_influence_cosinesim.py, pooling 'weighted_mean', one row: the
    final hidden states weighted by (t / sum 1..T), summed, L2-normalised."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([example.input_ids]), output_hidden_states=True)
    states = out.hidden_states[-1]
    weights = torch.arange(states.size(1)).unsqueeze(0) + 1
    weights = weights / weights.sum(dim=1, keepdim=True)
    pooled = torch.sum(states * weights.unsqueeze(-1), dim=1)[0]
    return (pooled / torch.linalg.vector_norm(pooled)).numpy()


CHAT = [{"role": "user", "content": "Define the word 'otter'."},
        {"role": "assistant", "content": "A semiaquatic fish-eating mammal."}]  # fmt: skip


def check(model, tokenizer, rows, max_length):
    """rows: texts or conversations, rendered as the fine-tune renders them (engine.render)."""
    model.eval()
    examples = [render(tokenizer, r, max_length) for r in rows]
    want = np.stack([reference_batch1(model, e) for e in examples])
    for batch_size in (1, 3, len(rows)):
        got = hidden.represent(model, examples, tokenizer.pad_token_id, batch_size=batch_size)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_position_weights_count_real_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    w = hidden.position_weights(mask)
    np.testing.assert_allclose(w[0].numpy(), [1 / 6, 2 / 6, 3 / 6, 0])
    np.testing.assert_allclose(w[1].numpy(), [0.1, 0.2, 0.3, 0.4])


def test_equals_the_reference_at_batch_size_one_on_the_tiny_model(tiny_lm):
    model, tokenizer = lm.load_lm(str(tiny_lm))
    check(model, tokenizer, [*TEXTS, CHAT], 32)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_equals_the_reference_at_batch_size_one_on_smollm2():
    import json

    model, tokenizer = lm.load_lm(lm.PACKAGED_LM)
    texts = [json.loads(x)["text"] for x in DEMO_TARGETS.read_text().splitlines()[:4]] + TEXTS[:3]
    check(model, tokenizer, [*texts, CHAT], 48)  # the chat rendered with SmolLM2's template
