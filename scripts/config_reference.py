"""Write docs/config.md, the reference of every run config key, from the pydantic models.

Usage: python scripts/config_reference.py [OUT]   (default: docs/config.md)
tests/test_config.py checks that the committed page matches this script's output.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from upcycle.config import RunConfig
from upcycle.data.loaders import TaskSource
from upcycle.selection.external import CheckpointEntry, ExpertEntry, ExpertsFile

REPOSITORY = Path(__file__).resolve().parent.parent

HEADER = """# Config reference

A run config is a YAML file with the sections below. Every key is optional unless its
default column reads "required". An unknown key, a value of the wrong type or a value out of range
is an error that names the key. `upcycle run CONFIG --set KEY=VALUE` overrides one key,
e.g. `--set training.steps=100`. The example configs are in `configs/`.

This page is generated from the config models by `python scripts/config_reference.py`.
"""

EXPERTS_HEADER = """## Experts file

`upcycle merge --experts FILE --out RUN` and `upcycle select --experts FILE --out RUN` take
checkpoints fine-tuned elsewhere: one Hugging Face model folder or hub id per checkpoint
step, all fine-tuned from `base_model`. An example:

```yaml
base_model: sentence-transformers/all-MiniLM-L6-v2
data:
  root: /path/to/textsuite
  tasks: [sst2, trec]
experts:
  - task: sst2
    checkpoints:
      - {step: 100, path: /models/sst2/checkpoint-100}
      - {step: 200, path: /models/sst2/checkpoint-200}
  - task: trec
    checkpoints:
      - {step: 100, path: /models/trec/checkpoint-100}
      - {step: 200, path: /models/trec/checkpoint-200}
```

The sections `data`, `merging`, `selection` and `evaluation` are those of a run config.
"""


def type_name(annotation: object) -> str:
    """Return a short, readable name for a field's type annotation."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(argument) for argument in arguments)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(argument) for argument in arguments)
    if origin is typing.Annotated:
        return type_name(arguments[0])
    if origin is list:
        return f"list of {type_name(arguments[0])}"
    if origin is dict:
        return f"mapping of {type_name(arguments[0])} to {type_name(arguments[1])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "entry" if annotation is TaskSource else "section"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def constraints(field: FieldInfo) -> str:
    """Return the field's range or length constraints, e.g. '>= 1, <= 1000'."""
    parts = []
    symbols = {Ge: (">=", "ge"), Gt: (">", "gt"), Le: ("<=", "le"), Lt: ("<", "lt")}
    for item in field.metadata:
        for kind, (symbol, attribute) in symbols.items():
            if isinstance(item, kind):
                parts.append(f"{symbol} {getattr(item, attribute)}")
        if isinstance(item, MinLen):
            parts.append(f"at least {item.min_length} long")
        if isinstance(item, MaxLen):
            parts.append(f"at most {item.max_length} long")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "its defaults"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "null"
    return f"`{value!r}`".replace("|", "\\|")


def section_model(annotation: object) -> type[BaseModel] | None:
    """Return the model of a nested section, including an optional one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        if isinstance(argument, type) and issubclass(argument, BaseModel):
            if typing.get_origin(annotation) is list:
                return None
            return argument
    return None


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def write_model(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    """Append a table of `model`'s keys, then one section per nested model."""
    title = prefix or "top level"
    lines += ["", f"## `{title}`" if prefix else "## Top level", ""]
    doc = (model.__doc__ or "").strip()
    if doc and model is not RunConfig:
        lines += [cell(doc.split("\n\n")[0]), ""]
    lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        child = section_model(field.annotation)
        if child is not None:
            nested.append((child, key))
        lines.append(
            f"| `{key}` | {cell(type_name(field.annotation))} | {default_text(field)} | "
            f"{constraints(field)} | {cell(field.description or '')} |"
        )
    for child, key in nested:
        write_model(child, key, lines)


def reference() -> str:
    lines = [HEADER.rstrip()]
    write_model(RunConfig, "", lines)
    write_model(TaskSource, "data.tasks[]", lines)
    lines += ["", EXPERTS_HEADER.rstrip()]
    for model, prefix in (
        (ExpertsFile, "experts file"),
        (ExpertEntry, "experts[]"),
        (CheckpointEntry, "experts[].checkpoints[]"),
    ):
        write_model(model, prefix, lines)
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPOSITORY / "docs/config.md"
    out.write_text(reference())


if __name__ == "__main__":
    main()
