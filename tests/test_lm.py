"""engine.lm on a tiny random Llama: examples, padding, and perplexity = exp(mean token loss)."""

from __future__ import annotations

import math

import pytest
import torch

from raysift.engine import lm

TEXTS = [
    "GNU Octave is a high-level language for numerical computations.",
    "A short one.",
    "Tools to read, write and convert FITS images used in astronomy, with a library for C.",
    "x",
]


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    model, tokenizer = lm.load_lm(str(tiny_lm))
    return model.eval(), tokenizer


def test_perplexity_is_exp_of_mean_token_loss_computed_independently(tiny):
    """The independent computation: each text alone through transformers' own loss (mean over
    its len - 1 predicted tokens), weighted back to a token sum, no padding, no batching."""
    model, tokenizer = tiny
    total, count = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:63]
            ids = torch.tensor([ids + [tokenizer.eos_token_id]])
            loss = model(input_ids=ids, labels=ids).loss  # HF shifts and averages itself
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    examples = [lm.encode_text(tokenizer, t, 64) for t in TEXTS]
    got = lm.perplexity(model, examples, tokenizer.pad_token_id, batch_size=3)
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_padding_and_batch_size_do_not_change_the_loss(tiny):
    model, tokenizer = tiny
    examples = [lm.encode_text(tokenizer, t, 64) for t in TEXTS]
    one = lm.perplexity(model, examples, tokenizer.pad_token_id, batch_size=1)
    four = lm.perplexity(model, examples, tokenizer.pad_token_id, batch_size=4)
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_lora_trains_only_adapters_and_changes_the_loss(tiny_lm):
    model, tokenizer = lm.load_lm(str(tiny_lm))
    model = lm.with_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = lm.collate([lm.encode_text(tokenizer, t, 64) for t in TEXTS], tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(20):
        nll, n = lm.token_nll(model, batch)
        loss = nll / n
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < first - 0.1


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="finetune.model: .*no config.json"):
        lm.resolve_lm_path(str(tmp_path / "nope"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loading_is_quiet_unless_verbose(tmp_path, monkeypatch, capfd):
    """Converting the packaged SmolLM2 from its GGUF file (tqdm bars from transformers and the
    GGUF reader, then a save's bar) and loading it print nothing; the caller's own progress-bar
    setting comes back afterwards, and RAYSIFT_VERBOSE=1 leaves the libraries alone."""
    from transformers.utils import logging as hf_logging

    from raysift.engine.loading import quiet

    monkeypatch.setenv("RAYSIFT_CACHE", str(tmp_path / "cache"))  # a first conversion
    monkeypatch.delenv("RAYSIFT_VERBOSE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    model, tok = lm.load_lm(lm.PACKAGED_LM)
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), (out[-500:], err[-500:])
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting, restored
    with quiet():
        assert not hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv("RAYSIFT_VERBOSE", "1")
    with quiet():
        assert hf_logging.is_progress_bar_enabled()
