"""Build an instruction-format pool and three targets from the shared pool's structured sources.

    python demo/build_instruct.py                          # the packaged slice -> demo/instruct/
    python demo/build_instruct.py --out runs/bench/instruct --scale 5   # the benchmark's pool

Every row is a conversation (`messages`: a user turn and an assistant turn) built from real text
with real structure; nothing is written by hand or by a model:

    define     wordnet 3.0 synset "lemma, lemma: gloss" -> user "What does the word 'lemma'
               mean?", assistant the gloss                                   (label: supersense)
    describe   debian_pkg: package name (its `group`) -> user "Describe the Debian package X.",
               assistant the description                                       (label: section)
    section    debian_pkg -> user "Which Debian section is the package X in? ...", assistant
               the section name                                                (label: section)
    complete   python_code: a function's signature and docstring -> user "Complete this Python
               function: ...", assistant the body                             (label: library)
    chat       chatterbot "Q: ...\\nA: ..." -> user Q, assistant A           (label: category)

Targets (a few examples of one task each, and held-out rows to score it), their rows' groups
(synsets, packages, source files) removed from the pool, so no held-out answer is in the pool:

    define_animals   `define` on wordnet's noun.animal synsets; held-out rows carry four choices
                     (the gloss and three other animal glosses, seeded): multiple-choice accuracy
    debian_sections  `section` on packages of the sections science, math, electronics, hamradio
                     (the shared pool's label-shift target); held out: exact match of the section
    python_torch     `complete` on torch's functions; held-out rows carry four choices (the body
                     and three other torch bodies): multiple-choice accuracy

Only the shared pool's permissive sources are used (wordnet: WordNet 3.0 licence; debian_pkg: per
package, DFSG; python_code: PSF/BSD/MIT/Apache; chatterbot: BSD-3). Seeded: the same files every
run. Provenance of the shared pool: ../shared/data/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data" / "pool.parquet"
SECTIONS = ("science", "math", "electronics", "hamradio")
# rows per task in the packaged slice (x --scale for a larger pool)
POOL = {"define": 700, "describe": 400, "section": 400, "complete": 500, "chat": 300}
TARGETS, HELDOUT = 60, 40  # per target (packaged slice; x --scale too)
_DOC = re.compile(r'^([\s\S]*?(?:"""|\'\'\')[\s\S]*?(?:"""|\'\'\')[^\n]*\n)([\s\S]+)$')


def chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def define(row) -> list[dict] | None:
    names, _, gloss = row.text.partition(": ")
    if not gloss:
        return None
    word = names.split(",")[0].strip()
    return chat(f"What does the word '{word}' mean?", gloss.strip())


def describe(row) -> list[dict]:
    return chat(f"Describe the Debian package {row.group}.", row.text.strip())


def section(row) -> list[dict]:
    question = (f"Which Debian section is the package {row.group} in? Answer with the section "
                "name only.")  # fmt: skip
    return chat(question, row.label)


def complete(row) -> list[dict] | None:
    m = _DOC.match(row.text)
    if not m or not m.group(2).strip():
        return None
    return chat(f"Complete this Python function:\n\n{m.group(1).rstrip()}", m.group(2).rstrip())


def qa(row) -> list[dict] | None:
    q, sep, a = row.text.partition("\nA: ")
    if not sep:
        return None
    return chat(q.removeprefix("Q: ").strip(), a.strip())


TASKS = {"define": ("wordnet", define), "describe": ("debian_pkg", describe),
         "section": ("debian_pkg", section), "complete": ("python_code", complete),
         "chat": ("chatterbot", qa)}  # fmt: skip


def rows(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """The task's conversations, one per usable source row (id, group, label, messages)."""
    make = TASKS[task][1]
    out = [(r.id, r.group, r.label, m) for r in df.itertuples() if (m := make(r)) is not None]
    return pd.DataFrame(out, columns=["source_id", "group", "label", "messages"]).assign(task=task)


def with_choices(held: pd.DataFrame, others: pd.DataFrame, rng) -> pd.DataFrame:
    """Four choices per held-out row: its answer and three other rows' answers, shuffled; `answer`
    is the right one's index."""
    pool = [m[-1]["content"] for m in others["messages"]]
    choices, answers = [], []
    for m in held["messages"]:
        right = m[-1]["content"]
        wrong = [pool[i] for i in rng.permutation(len(pool)) if pool[i] != right][:3]
        options = [right, *wrong]
        order = rng.permutation(4)
        choices.append([options[i] for i in order])
        answers.append(int(np.flatnonzero(order == 0)[0]))
    return held.assign(choices=choices, answer=answers)


def build(shared: Path, out: Path, scale: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    df = pd.read_parquet(shared, columns=["id", "source", "label", "group", "text"])
    per_task = {t: rows(df[df.source == src], t) for t, (src, _) in TASKS.items()}
    n_t, n_h = TARGETS * scale, HELDOUT * scale
    targets = {
        "define_animals": ("define", lambda r: r.label == "noun.animal", "multiple_choice"),
        "debian_sections": ("section", lambda r: r.label.isin(SECTIONS), "exact_match"),
        "python_torch": ("complete", lambda r: r.label == "torch", "multiple_choice"),
    }
    removed: dict[str, set[str]] = {t: set() for t in TASKS}
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, (task, where, metric) in targets.items():
        rows_t = per_task[task][where(per_task[task])]
        groups = rng.permutation(rows_t["group"].unique())
        # whole groups: the first ones until n_t target rows, the next until n_h held-out rows
        sizes = rows_t.groupby("group").size()[groups].to_numpy()
        reach = np.cumsum(sizes)
        q_end = int(np.searchsorted(reach, n_t)) + 1
        h_end = int(np.searchsorted(reach, reach[q_end - 1] + n_h)) + 1
        in_t = rows_t[rows_t["group"].isin(groups[:q_end])].sample(n=n_t, random_state=seed)
        in_h = rows_t[rows_t["group"].isin(groups[q_end:h_end])].sample(n=n_h, random_state=seed)
        if metric == "multiple_choice":
            rest = rows_t[~rows_t["group"].isin(groups[:h_end])]
            in_h = with_choices(in_h, rest, rng)
        write(out / f"{name}.targets.jsonl", in_t, ["messages", "label"])
        scored = ["choices", "answer"] if metric == "multiple_choice" else []
        write(out / f"{name}.heldout.jsonl", in_h, ["messages", "label", *scored])
        removed[task] |= set(groups[:h_end])
        counts[name] = {"targets": len(in_t), "heldout": len(in_h), "metric": metric}
    parts = []
    for task, n in POOL.items():
        rest = per_task[task][~per_task[task]["group"].isin(removed[task])]
        if task in ("describe", "section"):  # one package never serves both: no answer leaks
            rest = rest[~rest["group"].isin(removed["describe"] | removed["section"])]
        parts.append(rest.sample(n=min(n * scale, len(rest)), random_state=seed))
    pool = pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    write(out / "pool.jsonl", pool, ["messages", "task", "label"])
    counts["pool"] = pool["task"].value_counts().to_dict()
    (out / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    return counts


def write(path: Path, df: pd.DataFrame, columns: list[str]) -> None:
    with path.open("w") as fh:
        for record in df[columns].to_dict("records"):
            fh.write(json.dumps(record) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=HERE / "instruct")
    ap.add_argument("--scale", type=int, default=1, help="x the packaged slice's row counts")
    args = ap.parse_args()
    print(json.dumps(build(args.pool, args.out, args.scale), indent=1))


if __name__ == "__main__":
    main()
