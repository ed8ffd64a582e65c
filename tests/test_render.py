"""engine.render: chat rows, pairs and plain text -> token ids and labels. Labels exactly on the
assistant turns (content and end-of-turn token), with SmolLM2-Instruct's chat template and with
the fallback template; the end token placed before truncation, never after."""

from __future__ import annotations

import re

import pytest

from raysift.engine import lm
from raysift.engine.render import (
    IGNORE,
    RenderError,
    check_messages,
    encode_pair,
    pair,
    plain,
    prompt,
    render,
    turns,
)

CHAT = [{"role": "user", "content": "Define the word 'otter'."},
        {"role": "assistant", "content": "A semiaquatic fish-eating mammal."}]  # fmt: skip
MULTI = [{"role": "system", "content": "Answer in one sentence."},
         {"role": "user", "content": "What is FITS?"},
         {"role": "assistant", "content": "An image format used in astronomy."},
         {"role": "user", "content": "And HDF5?"},
         {"role": "assistant", "content": "A container for large numerical arrays."}]  # fmt: skip


@pytest.fixture(scope="module")
def smol():
    return lm.load_tokenizer(lm.PACKAGED_LM)  # ChatML: <|im_start|>role\n...<|im_end|>\n


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    return lm.load_tokenizer(str(tiny_lm))  # WordPiece, no chat template: the fallback


def labelled(tok, ex) -> str:
    return tok.decode([i for i, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE])


def test_chat_template_labels_only_the_assistant_turns(smol):
    ex = render(smol, CHAT, 512)
    whole = smol.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert ex.input_ids == whole  # the tokenizer's own template, untouched
    assert labelled(smol, ex) == "A semiaquatic fish-eating mammal.<|im_end|>"
    asked = smol.apply_chat_template(CHAT[:1], tokenize=True, add_generation_prompt=True)
    start = len(asked["input_ids"])
    assert ex.labels[:start] == [IGNORE] * start  # system (the template's), user, markup
    assert ex.labels[-1] == IGNORE  # the template's newline after <|im_end|>

    multi = render(smol, MULTI, 512)
    want = "An image format used in astronomy.<|im_end|>A container for large numerical arrays."
    assert labelled(smol, multi) == want + "<|im_end|>"
    assert "Answer in one sentence" in smol.decode(multi.input_ids)  # the system turn: context


def test_a_pair_is_a_user_and_an_assistant_turn(smol, tiny):
    for tok in (smol, tiny):
        got = encode_pair(tok, CHAT[0]["content"], CHAT[1]["content"], 512)
        assert got == render(tok, pair(CHAT[0]["content"], CHAT[1]["content"]), 512)


def test_fallback_template_without_a_chat_template(tiny):
    assert not getattr(tiny, "chat_template", None)
    ex = render(tiny, MULTI, 512)
    text = tiny.decode(ex.input_ids)
    assert text.startswith("system : answer in one sentence.")  # WordPiece lower-cases
    want = ("an image format used in astronomy. [SEP] a container for large numerical arrays. "
            "[SEP]")  # fmt: skip
    assert labelled(tiny, ex) == want  # the content and the end token of each assistant turn
    assert prompt(tiny, MULTI[:-1]).endswith("User: And HDF5?\nAssistant: ")


def test_the_end_token_comes_before_truncation(smol, tiny):
    long = " ".join(["word"] * 200)
    for tok in (smol, tiny):
        cut = render(tok, long, 16)
        assert len(cut.input_ids) == 16 and tok.eos_token_id not in cut.input_ids
        fits = render(tok, "a short text", 16)
        assert fits.input_ids[-1] == tok.eos_token_id and fits.labels == fits.input_ids
    full = render(smol, CHAT, 512)
    cut = render(smol, CHAT, len(full.input_ids) - 3)  # the answer's last tokens cut off
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert smol.eos_token_id not in cut.input_ids[len(cut.input_ids) - 3 :]
    assert cut.labels == full.labels[: len(cut.labels)]


def test_bad_conversations_say_what_is_wrong():
    for value, message in (
        ("hello", "expected a list of messages"),
        ([{"role": "bot", "content": "x"}], "message 0 has role 'bot'"),
        ([{"role": "user", "content": 3}], "message 0 (user) has content of type int"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([["user", "hi"]], "message 0 is not an object"),
    ):
        with pytest.raises(RenderError, match=re.escape(message)):
            check_messages(value)
    assert check_messages(MULTI) == MULTI


def test_plain_text_and_turns():
    assert plain(CHAT) == ("User: Define the word 'otter'.\n\n"
                           "Assistant: A semiaquatic fish-eating mammal.")  # fmt: skip
    assert turns(MULTI, "assistant") == ("An image format used in astronomy.\n\n"
                                         "A container for large numerical arrays.")  # fmt: skip


def test_an_answer_that_starts_with_indentation(smol):
    """Code: the template's newline and the body's indentation tokenise as one token, which no
    rendering of the prefix has; the answer is still found on the text."""
    code = [{"role": "user", "content": "Complete: def inc(x):"},
            {"role": "assistant", "content": "    return x + 1"}]  # fmt: skip
    ex = render(smol, code, 512)
    got = labelled(smol, ex)
    assert got.endswith("return x + 1<|im_end|>") and "Complete" not in got
    assert ex.input_ids == smol.apply_chat_template(code, tokenize=True)["input_ids"]
