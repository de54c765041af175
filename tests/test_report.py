"""The morning report on a hand-made ledger: the plot is written and the summary states the facts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "agent" / "report.py"), *args], capture_output=True, text=True)


def write_ledger(path: Path) -> None:
    ledger = Ledger(path)
    common = dict(tag="nov28", preset="cpu", data_fingerprint="builtin:abc")
    ledger.append(dict(common, commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=1.50, sigma=0.004,
                       description="baseline 1/2", reason="baseline run 1 (seed 42)"))
    ledger.append(dict(common, commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=1.505, sigma=0.004,
                       description="baseline 2/2", reason="baseline run 2 (seed 43)"))
    ledger.append(dict(common, commit="bbbbbbb", experiment="NS-1", status="keep", val_bpb=1.48, sigma=0.004,
                       description="MUON_NS_STEPS = 3", reason="-0.0200 < -2 sigma = -0.0080", cost_usd=0.25))
    ledger.append(dict(common, commit="ccccccc", experiment="MM-5", status="discard", val_bpb=1.481, sigma=0.004,
                       description="constant momentum", reason="+0.0010 >= -2 sigma = -0.0080"))
    ledger.append(dict(common, commit="ddddddd", experiment="ABL-1", status="crash", sigma=0.004,
                       description="AdamW for matrices", reason="exit code 1: ValueError"))
    ledger.append(dict(common, commit="eeeeeee", experiment="C-1", status="invalid", val_bpb=0.9, sigma=0.004,
                       description="memory tokens", reason="causality: ... moved earlier logits by up to 3.2"))
    ledger.append(dict(common, tag="other", commit="fffffff", experiment="baseline", status="keep", val_bpb=2.0,
                       description="baseline 1/1", reason="baseline run 1 (seed 42)"))


def test_report_plots_and_summarises_the_chosen_tag(tmp_path):
    ledger, out = tmp_path / "experiments.tsv", tmp_path / "progress.png"
    write_ledger(ledger)
    result = report("--ledger", str(ledger), "--out", str(out), "--tag", "nov28")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = result.stdout
    assert "tag nov28: 6 runs" in text
    assert "best: val_bpb 1.480000 at bbbbbbb (NS-1), +0.020000 better than the baseline" in text
    assert "experiments: 1 crash, 1 discard, 1 invalid, 1 keep" in text
    assert "proposer cost: $0.25" in text
    assert "causality:" in text and "ABL-1: exit code 1" in text


def test_report_defaults_to_the_last_tag(tmp_path):
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)
    result = report("--ledger", str(ledger), "--out", str(tmp_path / "p.png"))
    assert result.returncode == 0
    assert "tag other: 1 runs" in result.stdout


def test_report_without_a_ledger_or_rows_says_what_to_do(tmp_path):
    missing = report("--ledger", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "p.png"))
    assert missing.returncode == 2 and "run python agent/loop.py first" in missing.stderr
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)
    unknown = report("--ledger", str(ledger), "--out", str(tmp_path / "p.png"), "--tag", "dec01")
    assert unknown.returncode == 2 and "no rows for tag 'dec01'" in unknown.stderr
