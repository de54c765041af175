"""
The morning report: progress.png and a summary of what the loop kept, discarded and refused.

    python agent/report.py                  # the latest tag in experiments.tsv
    python agent/report.py --tag nov28 --out nov28.png
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from agent.ledger import Ledger  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"baseline": "tab:blue", "keep": "tab:green", "discard": "0.6", "crash": "tab:red", "timeout": "tab:red",
           "invalid": "tab:purple"}


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def latest_tag(rows: list[dict[str, str]]) -> str | None:
    return rows[-1]["tag"] if rows else None


def plot(rows: list[dict[str, str]], out: Path, title: str) -> None:
    """val_bpb per run in ledger order, the running best, and the noise band around the baseline."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    values = [_float(r["val_bpb"]) for r in rows]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    top = max(finite) if finite else 1.0
    best, best_line = math.nan, []
    for i, (row, value) in enumerate(zip(rows, values)):
        status = row["status"]
        if status == "keep" and math.isfinite(value):
            if row["experiment"] == "baseline":
                best = value if math.isnan(best) else best
            else:
                best = value
                ax.annotate(row["experiment"], (i, value), textcoords="offset points", xytext=(4, -12), fontsize=8)
        best_line.append(best)
        shown = value if math.isfinite(value) and value > 0 else top
        label = "baseline" if row["experiment"] == "baseline" else status
        ax.scatter(i, shown, color=COLOURS.get(label, "black"), marker="x" if status in ("crash", "timeout") else "o",
                   s=36, zorder=3, label=label)
    ax.step(range(len(rows)), best_line, where="post", color="tab:green", alpha=0.6, label="best so far")
    sigma = _float(next((r["sigma"] for r in reversed(rows) if r["sigma"]), ""))
    baseline = next((_float(r["val_bpb"]) for r in rows if r["experiment"] == "baseline" and r["status"] == "keep"), math.nan)
    if math.isfinite(sigma) and math.isfinite(baseline):
        ax.axhspan(baseline - 2 * sigma, baseline + 2 * sigma, color="tab:blue", alpha=0.08, label="baseline ± 2 sigma")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
    ax.set_xlabel("run (ledger order)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def summary(rows: list[dict[str, str]]) -> list[str]:
    baselines = [r for r in rows if r["experiment"] == "baseline" and r["status"] == "keep"]
    kept = [r for r in rows if r["status"] == "keep" and r["experiment"] != "baseline"]
    counts = Counter(r["status"] for r in rows if r["experiment"] != "baseline")
    lines = []
    if baselines:
        sigma = baselines[-1]["sigma"] or rows[-1]["sigma"]
        lines.append(f"baseline: val_bpb {baselines[0]['val_bpb']} ({len(baselines)} runs, sigma {sigma or 'unknown'})")
    best = kept[-1] if kept else (baselines[0] if baselines else None)
    if best and baselines:
        gain = _float(baselines[0]["val_bpb"]) - _float(best["val_bpb"])
        lines.append(f"best: val_bpb {best['val_bpb']} at {best['commit'] or '-'} ({best['experiment']}), "
                     f"{gain:+.6f} better than the baseline")
    lines.append("experiments: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    cost = sum(_float(r["cost_usd"]) for r in rows if math.isfinite(_float(r["cost_usd"])))
    if cost:
        lines.append(f"proposer cost: ${cost:.2f}")
    if kept:
        lines.append("kept:")
        lines += [f"  {r['commit']} {r['experiment']}: {r['description']} -> {r['val_bpb']} ({r['reason']})" for r in kept]
    refused = [r for r in rows if r["status"] == "invalid"]
    if refused:
        lines.append("invalid (the guard or the proposer refused them):")
        lines += [f"  {r['commit'] or '-'} {r['experiment']}: {r['reason']}" for r in refused]
    failed = [r for r in rows if r["status"] in ("crash", "timeout")]
    if failed:
        lines.append("crashed or timed out:")
        lines += [f"  {r['commit'] or '-'} {r['experiment']}: {r['reason']}" for r in failed]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python agent/report.py", description="progress.png and a summary of a tag")
    parser.add_argument("--tag", help="default: the tag of the ledger's last row")
    parser.add_argument("--ledger", type=Path, default=REPO_ROOT / "experiments.tsv")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "progress.png")
    args = parser.parse_args(argv)
    if not args.ledger.exists():
        print(f"report: no ledger at {args.ledger}; run python agent/loop.py first.", file=sys.stderr)
        return 2
    read = Ledger(args.ledger).read()
    for problem in read.problems:
        print(f"report: {problem}", file=sys.stderr)
    tag = args.tag or latest_tag(read.rows)
    rows = [r for r in read.rows if r["tag"] == tag]
    if not rows:
        print(f"report: the ledger has no rows for tag {tag!r}.", file=sys.stderr)
        return 2
    first = rows[0]
    plot(rows, args.out, f"autoresearch/{tag}: {first['preset']} preset, data {first['data_fingerprint']}")
    print(f"tag {tag}: {len(rows)} runs, plot in {args.out}")
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
