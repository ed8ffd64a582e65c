"""A task metric for a fine-tuned model, through EleutherAI's lm-evaluation-harness (PyPI
`lm-eval`, the optional extra `raysift[eval]`), offline: a local task generated from held-out
target rows, run on a model already in memory (the base model, or a LoRA adapter over it).

    multiple_choice   rows carry `choices` (a list of answers) and `answer` (the right one's
                      index): accuracy of picking the choice with the highest log-likelihood as
                      the assistant's answer (the harness's `multiple_choice`, metric `acc`)
    exact_match       rows are conversations: the model generates an answer to all but the last
                      assistant turn (greedy, up to `max_new_tokens`), compared with that turn's
                      content (case and punctuation ignored; the harness's `exact_match`)

The prompt is the conversation rendered as the fine-tune renders it, up to where the answer starts
(`engine.render.prompt`: the tokenizer's chat template and its generation prompt), so the model is
asked what it was trained to answer. The harness writes nothing outside `folder` and fetches
nothing: the task's data is a JSON lines file there, its metrics are the harness's own.

References:
    Gao et al. A framework for few-shot language model evaluation (lm-evaluation-harness), 2021-.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

from raysift.engine.render import Messages, prompt

KINDS = ("multiple_choice", "exact_match")


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def silenced():
    """Nothing reaches this process's stdout or stderr while the block runs, from Python or
    from a child process (the harness asks `git` for a commit hash): both file descriptors go to
    a scratch file, restored afterwards."""
    import os
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as scratch, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # fmt: skip
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def task_rows(tokenizer, rows: list[dict], kind: str) -> list[dict]:
    """The harness's documents: {"prompt", "choices", "answer"} (multiple_choice) or {"prompt",
    "answer"} (exact_match) from rows of {"messages", and for multiple_choice "choices",
    "answer"}."""
    out = []
    for r in rows:
        messages: Messages = r["messages"]
        if kind == "exact_match":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out.append({"prompt": prompt(tokenizer, messages[:last]),
                        "answer": messages[last]["content"]})  # fmt: skip
        else:
            asked = [m for m in messages if m["role"] != "assistant"] or messages[:1]
            choices = [str(c) for c in r["choices"]]
            out.append({"prompt": prompt(tokenizer, asked), "choices": choices,
                        "answer": int(r["answer"])})  # fmt: skip
    return out


def _task_yaml(name: str, data: Path, kind: str, stop: list[str], max_new_tokens: int) -> str:
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(data))}\ntest_split: test\n"
            "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
            "target_delimiter: \"\"\n")  # fmt: skip
    if kind == "multiple_choice":
        return head + ("output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
                       "metric_list:\n  - metric: acc\n")  # fmt: skip
    return head + (f"output_type: generate_until\ngeneration_kwargs:\n  until: {json.dumps(stop)}\n"
                   f"  max_gen_toks: {max_new_tokens}\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n    ignore_case: true\n"
                   "    ignore_punctuation: true\n")  # fmt: skip


def measure(
    model,
    tokenizer,
    rows: list[dict],
    kind: str,
    folder: Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
) -> dict:
    """Run the task on `model` (a transformers causal LM, a peft model over one included).
    Returns {"metric", "value", "per_item" (each row's score, input order), "items", "seconds"}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if kind not in KINDS:
        raise ValueError(f"task metric kind must be one of {KINDS}, got {kind!r}")
    folder.mkdir(parents=True, exist_ok=True)
    docs = task_rows(tokenizer, rows, kind)
    data = folder / "task.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    name = f"raysift_{kind}"
    stop = [s for s in {tokenizer.eos_token, "\n\n"} if s]
    (folder / f"{name}.yaml").write_text(_task_yaml(name, data, kind, stop, max_new_tokens))
    t0 = time.perf_counter()
    device = str(next(model.parameters()).device)
    with silenced():  # the harness's progress bars, notes and its `git` call's complaints
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[name], task_manager=TaskManager(include_path=str(folder)),
            log_samples=True, bootstrap_iters=0, verbosity="ERROR",
        )  # fmt: skip
    metric = "acc" if kind == "multiple_choice" else "exact_match"
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    per_item = [float(s[metric]) for s in samples]
    return {"metric": metric, "kind": kind, "value": float(sum(per_item) / len(per_item)),
            "per_item": per_item, "items": len(per_item),
            "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
