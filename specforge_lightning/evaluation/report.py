"""Write an evaluation result: the JSON, a per-position acceptance plot next to it, a short summary."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_report(result: Mapping[str, Any], output: str | Path) -> tuple[Path, Path]:
    """Write ``output`` (JSON) and ``output`` with a ``.png`` suffix; returns both paths."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, out)
    png = out.with_suffix(".png")
    plot_acceptance(result, png)
    return out, png


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def plot_acceptance(result: Mapping[str, Any], path: str | Path) -> None:
    """Bars: measured conditional acceptance per draft position; dots: teacher-forced accuracy."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg by default

    measured = [float("nan") if r is None else r for r in result.get("per_position_acceptance", [])]
    tf = list(result.get("teacher_forced_accuracy", []))
    positions = list(range(1, max(len(measured), len(tf)) + 1))
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    if measured:
        ax.bar(positions[: len(measured)], measured, color="#4c72b0", label="measured (conditional)")
    if tf:
        ax.plot(positions[: len(tf)], tf, "o--", color="#dd8452", label="teacher-forced accuracy")
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(positions)
    ax.set_title(
        f"AL measured {_fmt(result.get('acceptance_length'))}, simulated "
        f"{_fmt(result.get('simulated_acceptance_length'))}, speedup {_fmt(result.get('speedup'))}x",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def format_summary(result: Mapping[str, Any]) -> str:
    """A few human lines: the headline numbers and the per-position rates."""
    s = result.get("settings", {})
    rates = ", ".join(_fmt(r) for r in result.get("per_position_acceptance", []))
    lines = [
        f"prompts {result.get('num_prompts')} ({s.get('prompts', '?')}), k={s.get('num_draft_tokens')}, "
        f"max_new_tokens {s.get('max_new_tokens')}, target dtype {s.get('dtype')}, threads {s.get('threads')}",
        f"acceptance length: measured {_fmt(result.get('acceptance_length'))} "
        f"(simulated from teacher-forced accuracy {_fmt(result.get('simulated_acceptance_length'))})",
        f"per-position acceptance: [{rates}]",
        f"speed: target {_fmt(result.get('target_tokens_per_s'), 1)} tok/s, speculative "
        f"{_fmt(result.get('speculative_tokens_per_s'), 1)} tok/s, speedup {_fmt(result.get('speedup'))}x",
        f"outputs identical to target-only greedy: {result.get('identical_outputs')}/{result.get('num_prompts')}",
    ]
    if result.get("identical_outputs") != result.get("num_prompts") and s.get("dtype") != "float32":
        lines[-1] += " (expected in low precision: multi-token verification rounds differently; float32 is exact)"
    return "\n".join(lines)


__all__ = ["format_summary", "plot_acceptance", "write_report"]
