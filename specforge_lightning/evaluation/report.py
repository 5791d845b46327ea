"""Write an evaluation result: the JSON, a plot next to it (acceptance by depth, histogram, sweep), a summary."""

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
    """Acceptance by draft depth (bars measured, dots teacher-forced), the accepted-length histogram,
    and with ``--sweep`` acceptance length and speed-up against the verify width."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg by default

    measured = [float("nan") if r is None else r for r in result.get("per_position_acceptance", [])]
    tf = list(result.get("teacher_forced_accuracy", []))
    hist = list(result.get("accept_length_histogram", []))
    sweep = list(result.get("sweep", []))
    panels = 1 + bool(hist) + bool(sweep)
    fig = Figure(figsize=(5.2 * panels, 3.8), dpi=100)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    positions = list(range(1, max(len(measured), len(tf)) + 1))
    if measured:
        ax.bar(positions[: len(measured)], measured, color="#4c72b0", label="measured (conditional)")
    if tf:
        ax.plot(positions[: len(tf)], tf, "o--", color="#dd8452", label="teacher-forced accuracy")
    ax.set_xlabel("draft depth")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(positions)
    pol = result.get("policy", {})
    ax.set_title(
        f"{pol.get('kind', 'chain')} S={pol.get('num_steps')} K={pol.get('topk')} N={pol.get('num_draft_tokens')}: "
        f"AL {_fmt(result.get('acceptance_length'))} (sim {_fmt(result.get('simulated_acceptance_length'))}), "
        f"speedup {_fmt(result.get('speedup'))}x",
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=8)
    if hist:
        ax = axes[1]
        ax.bar(range(len(hist)), hist, color="#55a868")
        ax.set_xlabel("accepted draft tokens in a verify step")
        ax.set_ylabel("verify steps")
        ax.set_title(
            f"drafted {result.get('drafted_tokens')}, rejected {result.get('rejected_tokens')} "
            f"(wasted verify {_fmt(result.get('wasted_verify_fraction'))})",
            fontsize=9,
        )
    if sweep:
        _plot_sweep(axes[-1], sweep)
    fig.tight_layout()
    fig.savefig(str(path))


def _plot_sweep(ax: Any, sweep: list[Mapping[str, Any]]) -> None:
    width = [r.get("mean_verify_width") or 0.0 for r in sweep]
    al = [r.get("acceptance_length") or float("nan") for r in sweep]
    speed = [r.get("speedup") or float("nan") for r in sweep]
    ax.plot(width, al, "o", color="#4c72b0", label="acceptance length")
    for x, y, r in zip(width, al, sweep):
        p = r["policy"]
        tag = f"k{p['num_steps']}" if p["kind"] == "chain" else f"K{p['topk']}N{p['num_draft_tokens']}"
        ax.annotate(tag + ("t" if p.get("threshold") else ""), (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("mean verify width (tokens per target forward)")
    ax.set_ylabel("acceptance length")
    twin = ax.twinx()
    twin.plot(width, speed, "s", color="#c44e52", label="speed-up")
    twin.set_ylabel("speed-up (x)")
    ax.set_title("sweep: AL (o) and speed-up (s) vs verify width", fontsize=9)


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def format_summary(result: Mapping[str, Any]) -> str:
    """A few human lines: the headline numbers and the per-position rates."""
    s = result.get("settings", {})
    rates = ", ".join(_fmt(r) for r in result.get("per_position_acceptance", []))
    lines = [
        f"prompts {result.get('num_prompts')} ({s.get('prompts', '?')}), num_steps {s.get('num_steps')}, "
        f"topk {s.get('topk')}, num_draft_tokens {s.get('num_draft_tokens')}, threshold {s.get('draft_threshold')}, "
        f"temperature {s.get('temperature')}, "
        f"max_new_tokens {s.get('max_new_tokens')}, target dtype {s.get('dtype')}, threads {s.get('threads')}",
        f"acceptance length: measured {_fmt(result.get('acceptance_length'))} "
        f"(simulated from teacher-forced accuracy {_fmt(result.get('simulated_acceptance_length'))})",
        f"per-position acceptance: [{rates}]",
        f"speed: target {_fmt(result.get('target_tokens_per_s'), 1)} tok/s, speculative "
        f"{_fmt(result.get('speculative_tokens_per_s'), 1)} tok/s, speedup {_fmt(result.get('speedup'))}x",
        f"drafted {result.get('drafted_tokens')} tokens, accepted {result.get('accepted_tokens')}, rejected "
        f"{result.get('rejected_tokens')} (wasted verify work {_fmt(result.get('wasted_verify_fraction'))})",
    ]
    if "identical_outputs" in result:
        lines.append(f"outputs identical to target-only greedy: {result.get('identical_outputs')}/{result.get('num_prompts')}")
        if result.get("identical_outputs") != result.get("num_prompts") and s.get("dtype") != "float32":
            lines[-1] += " (expected in low precision: multi-token verification rounds differently; float32 is exact)"
    for r in result.get("sweep", []):
        p = r["policy"]
        lines.append(f"  sweep {p['kind']} S={p['num_steps']} K={p['topk']} N={p['num_draft_tokens']} "
                     f"t={p.get('threshold')}: AL {_fmt(r.get('acceptance_length'))}, width "
                     f"{_fmt(r.get('mean_verify_width'))}, speedup {_fmt(r.get('speedup'))}x")
    return "\n".join(lines)


__all__ = ["format_summary", "plot_acceptance", "write_report"]
