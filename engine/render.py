"""One rendering of a row into what a causal LM sees: token ids and a label mask.

A row is plain text (continued pre-training) or a conversation: a list of messages
`{"role": "system" | "user" | "assistant", "content": str}` (chat data; a prompt/response pair is
the conversation [user: prompt, assistant: response]). Everything that puts a row in front of the
causal LM renders it here: the fine-tune, the held-out perplexity, LESS's warm-up and gradients,
RDS+'s hidden states, and the task metric's prompts.

    plain text     its tokens, then the end token; every token is a target
    conversation   the tokenizer's own chat template when it has one (SmolLM2-Instruct: ChatML),
                   else the fallback template below; targets are the assistant turns' tokens only
                   (their content and their end-of-turn token): system and user turns and the
                   template's markup are context (label IGNORE)

The end token is appended *before* truncating to `max_length`, never after: a truncated row does
not end in an end token it never had (a model trained that way learns to stop mid-sentence).

The assistant spans are found on the template's text: an assistant message's content starts where
template(messages[:k], add_generation_prompt=True) ends and runs to its end-of-turn token in
template(messages[:k+1]); the whole text is tokenised once and a token is a target when its
characters overlap such a span. This needs a template whose renderings of the prefixes are
prefixes of each other (ChatML's are; a template that is not is an error naming it, not a silent
mis-mask), and a fast tokenizer (character offsets).

Fallback template (a tokenizer without a chat template), each message on its own:

    System: {content}\\n      (context)
    User: {content}\\n        (context)
    Assistant: {content}<end token>\\n   ("Assistant: " context; content and end token targets)

References:
    Ivison et al. Camels in a Changing Climate (Tulu 2), 2023: `encode_with_messages_format`.
    Xia et al. LESS, 2024: the prompt masked in the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IGNORE = -100  # label of a token the loss skips (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant")
Messages = list[dict]


@dataclass
class Example:
    """One training or evaluation sequence: token ids and their labels (IGNORE = not scored)."""

    input_ids: list[int]
    labels: list[int]


class RenderError(ValueError):
    """A row that cannot be rendered (bad messages, a template without the prefix property)."""


def check_messages(value) -> Messages:
    """A conversation as ingest keeps it: a list of {role, content} with known roles, string
    contents and at least one assistant turn. Raises RenderError naming what is wrong."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise RenderError(f"expected a list of messages, got {type(value).__name__}")
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise RenderError(f"message {k} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RenderError(f"message {k} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise RenderError(f"message {k} ({role}) has content of type {type(content).__name__},"
                              " expected a string")  # fmt: skip
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RenderError("no assistant turn: nothing to train on or score")
    return out


def pair(prompt: str, response: str) -> Messages:
    """A prompt/response pair as a conversation."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def row_of(
    row: dict,
    text_column: str = "text",
    messages_column: str = "messages",
    prompt_column: str = "prompt",
    response_column: str = "response",
) -> str | Messages:
    """What a stored row (a part's, a rows file's) is to `render`: its messages when it has
    them, a prompt/response pair as a conversation, else its text."""
    messages = row.get(messages_column)
    if isinstance(messages, list) and messages:
        return check_messages(messages)
    prompt_, response = row.get(prompt_column), row.get(response_column)
    if isinstance(prompt_, str) and isinstance(response, str):
        return pair(prompt_, response)
    text = row.get(text_column)
    if not isinstance(text, str):
        raise RenderError(f"no string {text_column!r}, messages or prompt + response")
    return text


def plain(messages: Messages) -> str:
    """The conversation as readable text (`Role: content` blocks): what ingest stores as the row's
    text -- its id, DSIR's n-grams, the sentence encoder's input, what a report shows."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def turns(messages: Messages, role: str) -> str:
    """The contents of one role's turns, joined by blank lines (embed.text: user / assistant)."""
    return "\n\n".join(m["content"] for m in messages if m["role"] == role)


def render(tokenizer, row: str | Messages, max_length: int) -> Example:
    """A row (text, or a conversation) -> token ids and labels, truncated to `max_length` after
    the end tokens are in place."""
    if isinstance(row, str):  # cut at max_length first: the same ids, without tokenising it all
        head = tokenizer(row, add_special_tokens=False, truncation=True, max_length=max_length)
        ids = (list(head["input_ids"]) + [tokenizer.eos_token_id])[:max_length]
        return Example(ids, list(ids))
    if getattr(tokenizer, "chat_template", None):
        ids, labels = _chat_template(tokenizer, row)
    else:
        ids, labels = _fallback(tokenizer, row)
    return Example(ids[:max_length], labels[:max_length])


def encode_text(tokenizer, text: str, max_length: int) -> Example:
    """A plain text (continued pre-training): every token a target, the end token included when
    it fits."""
    return render(tokenizer, text, max_length)


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> Example:
    """A prompt/response pair: the conversation [user: prompt, assistant: response]."""
    return render(tokenizer, pair(prompt, response), max_length)


def prompt(tokenizer, messages: Messages) -> str:
    """The conversation up to where the model's next answer starts, as text: what a task
    metric's model is asked (`messages` without the answer)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _text(tokenizer, messages: Messages, generation: bool = False) -> str:
    if not messages and not generation:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation)  # fmt: skip


def _chat_template(tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    """The template's text, tokenised once; a token is a target when its characters overlap an
    assistant turn's content or its end-of-turn token (found on the text: a token that joins the
    template's newline to the content's first characters, e.g. code indentation, is one token
    the prefix renderings do not share)."""
    text = _text(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        asked = _text(tokenizer, messages[:k], generation=True)  # up to the answer's start
        answered = _text(tokenizer, messages[: k + 1])
        if not (text.startswith(answered) and answered.startswith(asked)):
            raise RenderError(
                "the tokenizer's chat template does not render a conversation's prefixes as "
                "prefixes of it: the assistant turns cannot be found (use a ChatML-like template)"
            )
        end = len(answered)
        eos = tokenizer.eos_token or ""
        if eos and eos in answered[len(asked) :]:  # up to the end-of-turn token: not the
            end = answered.rindex(eos) + len(eos)  # template's newline after it
        spans.append((len(asked), end))
    labels = [i if any(e > a and s < b for a, b in spans) else IGNORE
              for i, (s, e) in zip(ids, offsets, strict=True)]  # fmt: skip
    return ids, labels


def _fallback(tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head = _tokens(tokenizer, f"{m['role'].capitalize()}: ")
        ids += head
        labels += [IGNORE] * len(head)
        body = _tokens(tokenizer, m["content"])
        if m["role"] == "assistant":
            body = body + [tokenizer.eos_token_id]
            ids += body
            labels += body
        else:
            ids += body
            labels += [IGNORE] * len(body)
        newline = _tokens(tokenizer, "\n")
        ids += newline
        labels += [IGNORE] * len(newline)
    return ids, labels
