"""README's generated references: the config table (from the config schema: every field, its
default, its description and bounds) and the methods table (from the method table).

    python -m raysift.reference          # rewrite the generated blocks of README.md, docs/config.md
    python -m raysift.reference --check  # exit 1 when one differs (what the tests run)
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from raysift.jobs.config import Config
from raysift.jobs.select import METHODS

BLOCKS = ("config", "methods")


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
    lines = ["| method | what it selects | needs | in-process (`raysift.select`) |",
             "|---|---|---|---|"]  # fmt: skip
    for name, m in METHODS.items():
        needs = ", ".join(sorted(m.needs)) or "nothing"
        lines.append(f"| `{name}` | {m.summary} | {needs} | {'yes' if m.local else 'no: Ray'} |")
    return "\n".join(lines)


def render(readme: str) -> str:
    for block, table in (("config", config_table()), ("methods", methods_table())):
        start, end = f"<!-- generated:{block} -->", f"<!-- /generated:{block} -->"
        if start not in readme or end not in readme:
            raise ValueError(f"README.md: no {start} ... {end} block")
        head, rest = readme.split(start, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{start}\n{table}\n{end}{tail}"
    return readme


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[argv.index("--root") + 1]) if "--root" in argv else Path(".")
    stale = []
    for path in (root / "README.md", root / "docs" / "config.md"):
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
