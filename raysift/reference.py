"""README's generated references: the config table (from the config schema: every field, its
default, its description and bounds) and the methods table (from the method table).

    python -m raysift.reference          # rewrite the generated blocks of README.md and docs/
    python -m raysift.reference --check  # exit 1 when one differs (what the tests run)
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from raysift.jobs.config import PRESETS, VECTOR_SELECTORS, Config
from raysift.jobs.methods import METHODS, REPRESENTATIONS


def _submodel(annotation) -> type[BaseModel] | None:
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            value = [v.method if hasattr(v, "method") else v.model_dump() for v in value]
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return ""
    text = json.dumps(value) if not isinstance(value, str) else value
    return "`" + text.replace("|", "\\|") + "`" if text != "" else ""


SIGNS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _bounds(field) -> str:
    # a field's constraints: on the Field itself, or inside Annotated[...] members of its union
    metadata = list(field.metadata)
    for t in (field.annotation, *typing.get_args(field.annotation)):
        for a in typing.get_args(t) or ():
            metadata += getattr(a, "__metadata__", ())
    parts = [f"{sign} {getattr(m, name)}" for m in metadata for name, sign in SIGNS
             if getattr(m, name, None) is not None]  # fmt: skip
    choices = _choices(field.annotation)
    out = []
    if choices:
        out.append("one of " + ", ".join(f"`{c}`" for c in choices))
    if parts:
        out.append(", ".join(dict.fromkeys(parts)))
    return "; ".join(out)


def _choices(annotation) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    found = []
    for a in typing.get_args(annotation):
        found += _choices(a)
    return found


def config_rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None and name != "methods":
            rows += config_rows(sub, f"{prefix}{name}.")
            continue
        if not field.description:
            raise ValueError(f"config field {prefix}{name} has no description")
        extra = _bounds(field)
        meaning = field.description + (f" ({extra})" if extra else "")
        rows.append((f"`{prefix}{name}`", _default(field), meaning.replace("|", "\\|")))
    return rows


def config_table() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| {f} | {d} | {m} |" for f, d, m in config_rows()]
    return "\n".join(lines)


def methods_table() -> str:
    lines = ["| method | what it selects | runs | in-process (`raysift.select`) |",
             "|---|---|---|---|"]  # fmt: skip
    for name, m in METHODS.items():
        if name in PRESETS:
            selector, rep, aggregation = PRESETS[name]
            runs = f"`{selector}` on `{rep}`, `{aggregation}`"
        elif name in VECTOR_SELECTORS:
            runs = "any representation"
        else:
            runs = {"texts": "its own n-gram features", "sources": "a source column"}.get(
                next(iter(m.needs), ""), "ids only")
        in_process = "yes" if m.local else "no: Ray"
        if name in PRESETS and not REPRESENTATIONS[PRESETS[name][1]].local:
            in_process = "no: Ray"
        elif m.local and name in VECTOR_SELECTORS:
            in_process = "yes, on " + ", ".join(
                f"`{r}`" for r, rep in REPRESENTATIONS.items() if rep.local)
        lines.append(f"| `{name}` | {m.summary} | {runs} | {in_process} |")
    return "\n".join(lines)


def representations_table() -> str:
    lines = ["| representation | what a row is | computed by | similarity |", "|---|---|---|---|"]
    for name, r in REPRESENTATIONS.items():
        stage = "the embed stage" if r.embed_stage else "the select stage (cached, reused)"
        lines.append(f"| `{name}` | {r.summary} | {stage} | {r.similarity} |")
    return "\n".join(lines)


TABLES = {"config": config_table, "methods": methods_table,
          "representations": representations_table}  # fmt: skip


def render(readme: str) -> str:
    """The generated blocks a file has, rewritten from the code."""
    for block, table in TABLES.items():
        start, end = f"<!-- generated:{block} -->", f"<!-- /generated:{block} -->"
        if start not in readme or end not in readme:
            continue
        head, rest = readme.split(start, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{start}\n{table()}\n{end}{tail}"
    return readme


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[argv.index("--root") + 1]) if "--root" in argv else Path(".")
    stale = []
    for path in (root / "README.md", *sorted((root / "docs").rglob("*.md"))):
        current = path.read_text()
        wanted = render(current)
        if current == wanted:
            continue
        if "--check" in argv:
            stale.append(str(path))
        else:
            path.write_text(wanted)
    if stale:
        print(f"{', '.join(stale)}: the generated tables differ from the code; run "
              "`python -m raysift.reference`", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
