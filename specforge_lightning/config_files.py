"""The one way every subcommand reads a fit config: a YAML file, its sections, its model class.

A fit config is what LightningCLI reads (``trainer:``, ``model:``, ``data:``), and a
section may sit under ``init_args`` at any level (``data: {class_path: ..., init_args:
{prepare: ...}}``) or not (``data: {prepare: ...}``). Every error here is a UserError
naming the file and, for a syntax error, the line.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from specforge_lightning.errors import UserError

RUN_CONFIG = "config.yaml"  # <default_root_dir>/config.yaml: the resolved config a fit saved, for evaluate/export
CHECKPOINT_DIR = "checkpoints"  # <default_root_dir>/checkpoints/: where a run's checkpoints live


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is ``{}``).

    Raises:
        UserError: the file does not exist, cannot be read, is not valid YAML (naming the
            file, line and column) or holds something other than a mapping at the top.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} cannot be read: {e}") from None
    try:
        node = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or str(e)
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise UserError(f"config file {path} holds a {type(node).__name__} at the top; expected a mapping of sections")
    return node


def section(config: Mapping[str, Any], dotted: str, *, source: str = "the config", required: bool = False) -> dict[str, Any]:
    """The section ``dotted`` (e.g. ``"data.prepare"``) of a fit config, through any ``init_args`` levels.

    ``source`` names the file in errors. A missing section is ``{}`` unless ``required``.

    Raises:
        UserError: a level on the way is not a mapping, or ``required`` and the section is missing.
    """
    node: Any = config
    walked: list[str] = []
    for key in dotted.split("."):
        if isinstance(node, Mapping) and key not in node and isinstance(node.get("init_args"), Mapping):
            node = node["init_args"]
        walked.append(key)
        node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            if required:
                raise UserError(f"{source} has no {'.'.join(walked)} section (needed: {dotted})")
            return {}
        if not isinstance(node, Mapping):
            raise UserError(f"{source}: {'.'.join(walked)} is a {type(node).__name__}, expected a mapping")
    return dict(node)


def model_class_path(config: Mapping[str, Any], *, source: str = "the config") -> str | None:
    """The class the fit config's ``model`` section names (``model.class_path`` or ``model: a.B``); None if none."""
    model = config.get("model")
    if model is None:
        return None
    if isinstance(model, str):
        return model
    if isinstance(model, Mapping) and isinstance(model.get("class_path"), str):
        return model["class_path"]
    raise UserError(f"{source}: model section names no class_path (e.g. model: {{class_path: package.module.Class}})")


def check_fields(values: Mapping[str, Any], known: Iterable[str], *, where: str) -> None:
    """Refuse keys that are not in ``known``, naming each with the nearest known key.

    ``where`` names the place, e.g. ``"data.prepare of configs/eagle3.yaml"``.
    """
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise UserError(f"unknown key(s) {', '.join(hints)} in {where}; known: {known}")


def run_config_of(checkpoint: str | Path) -> Path | None:
    """The resolved config saved by the fit that wrote ``checkpoint`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``)."""
    path = Path(checkpoint)
    if path.parent.name != CHECKPOINT_DIR:
        return None
    saved = path.parent.parent / RUN_CONFIG
    return saved if saved.is_file() else None


def nested_null_resets(args: Sequence[str]) -> list[str]:
    """``--a.init_args.b.c=null`` rewritten as ``--a.init_args.b={"c": null}``, which jsonargparse applies.

    jsonargparse rejects a dotted ``null`` for a field of a dataclass nested in a subclass's
    init_args (it hands the dataclass the string "None"); the JSON form of the parent resets the one
    field and keeps the others. Other arguments pass unchanged.
    """
    nulls = ("null", "None")
    out: list[str] = []
    items, i = list(args), 0
    while i < len(items):
        key, eq, value = items[i].partition("=")
        spaced = not eq and i + 1 < len(items) and items[i + 1] in nulls
        value = items[i + 1] if spaced else value
        parts = key.removeprefix("--").split(".")
        if key.startswith("--") and (eq or spaced) and value in nulls and "init_args" in parts[:-2]:
            out.append(f"--{'.'.join(parts[:-1])}={json.dumps({parts[-1]: None})}")
            i += 2 if spaced else 1
            continue
        out.append(items[i])
        i += 1
    return out
