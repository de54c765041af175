"""Three splits, three jobs: train (and meta) trains, val is selected on, test is never selected on.

The loader refuses val and test however it is reached; evaluate() scores both through a path of its
own; a cache prepared before the test split existed is refused, then re-prepared; the static check
names the spellings it can see; the val-vs-test rule is a pure function; and the loop, run as a
subprocess with tests/fakes/unigram_train.py, scores every baseline and keep on test and refuses a
model fitted on val rows it read through evaluate() itself, while the same fit on train is kept.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch

import prepare
from agent.guard import GAP_NOISE_FLOOR, gap_noise, static_problems, val_test_problem
from test_loop import FAST, TAG, Project, cache, make_project  # noqa: F401  (fixtures)

REPO_ROOT = Path(__file__).resolve().parents[1]
UNIGRAM_TRAIN = Path(__file__).resolve().parent / "fakes" / "unigram_train.py"
TRAIN_PY = (REPO_ROOT / "train.py").read_text()
LOADER_CALL = 'make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=DEVICE)'


@pytest.fixture(scope="module")
def tokenizer(prepared_builtin):
    return prepare.Tokenizer.from_directory()


# ---------------------------------------------------------------------------
# The loader serves train and meta only
# ---------------------------------------------------------------------------

class SneakyName(str):
    """A split name that claims to equal "train" while being "val"."""

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


def computed_val():
    return "".join(chr(c) for c in (118, 97, 108))


@pytest.mark.parametrize("call", [
    pytest.param(lambda tok: prepare.make_dataloader(tok, 2, 16, "val"), id="val"),
    pytest.param(lambda tok: prepare.make_dataloader(tok, 2, 16, "test"), id="test"),
    pytest.param(lambda tok: (lambda mk: mk(tok, 2, 16, "val"))(prepare.make_dataloader), id="alias"),
    pytest.param(lambda tok: functools.partial(prepare.make_dataloader, split="val")(tok, 2, 16), id="partial"),
    pytest.param(lambda tok: functools.partial(prepare.make_dataloader, split=computed_val())(tok, 2, 16),
                 id="partial-computed-name"),
    pytest.param(lambda tok: prepare.make_dataloader(tok, 2, 16, SneakyName("val")), id="str-subclass"),
])
def test_the_loader_refuses_val_and_test_however_it_is_called(tokenizer, call):
    with pytest.raises(ValueError, match=r"make_dataloader serves only the 'train' and 'meta' splits, not .*; "
                                         r"val and test are read only by the fixed evaluation \(evaluate\)\."):
        call(tokenizer)


def test_the_loader_still_serves_train_and_meta(tokenizer):
    for split in prepare.TRAINING_SPLITS:
        x, y, epoch = next(prepare.make_dataloader(tokenizer, 2, 16, split, seed=1, device="cpu"))
        assert x.shape == y.shape == (2, 16) and epoch == 1


def test_evaluate_scores_val_by_default_and_test_on_request_through_its_own_rows(tokenizer):
    vocab = tokenizer.get_vocab_size()
    seen = {"val": [], "test": []}

    def uniform(split):
        return lambda idx: seen[split].append(idx) or torch.zeros(*idx.shape, vocab)

    val = prepare.evaluate(uniform("val"), tokenizer, 16, device="cpu")
    test = prepare.evaluate(uniform("test"), tokenizer, 16, device="cpu", split="test")
    assert set(val) == {"val_bpb", "val_loss", "val_accuracy", "val_perplexity"}
    assert set(test) == {"test_bpb", "test_loss", "test_accuracy", "test_perplexity"}
    assert val["val_loss"] == pytest.approx(math.log(vocab)) and test["test_loss"] == pytest.approx(math.log(vocab))
    assert val["val_bpb"] != test["test_bpb"]  # other documents, other bytes per token
    steps = max(1, prepare.EVAL_TOKENS // (16 * prepare.MAX_SEQ_LEN))
    expected = {split: [x for x, _, _ in islice(prepare._packed_rows(tokenizer, 16, prepare.MAX_SEQ_LEN, split, None, "cpu"), steps)]
                for split in ("val", "test")}
    for split in ("val", "test"):
        assert len(seen[split]) == steps
        assert all(torch.equal(a, b) for a, b in zip(seen[split], expected[split]))
    assert not torch.equal(seen["val"][0], seen["test"][0])


def test_evaluate_refuses_a_training_split(tokenizer):
    with pytest.raises(ValueError, match="evaluate scores only the 'val' or 'test' split, not 'train'"):
        prepare.evaluate(lambda idx: idx, tokenizer, 2, device="cpu", split="train")


# ---------------------------------------------------------------------------
# A cache from before the test split
# ---------------------------------------------------------------------------

def test_a_cache_from_before_the_test_split_is_refused_then_re_prepared(run_python, assert_user_error, tmp_path):
    env = {"AUTORESEARCH_CACHE": str(tmp_path)}
    first = run_python("prepare.py", "--source", "builtin", env=env)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "prepared" / "cpu" / "prepared.json"
    manifest = json.loads(path.read_text())
    old = {k: v for k, v in manifest.items() if k not in ("test", "split_rule")}
    path.write_text(json.dumps(old))

    refused = run_python("train.py", env=env)
    assert "prepared before the test split existed; run python prepare.py again" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.returncode != 0

    again = run_python("prepare.py", "--source", "builtin", env=env)
    assert again.returncode == 0, again.stderr
    assert "re-preparing it" in again.stdout and "already prepared" not in again.stdout
    redone = json.loads(path.read_text())
    assert redone["split_rule"] == prepare.SPLIT_RULE and redone["test"] == manifest["test"]
    assert redone["fingerprint"] == manifest["fingerprint"]


def test_a_cache_prepared_for_another_stream_order_is_refused_then_re_prepared(run_python, tmp_path):
    """A tag's runs must read the training stream in one order: a cache from before the fixed, interleaved
    order is refused by train.py with what to do, and prepare.py re-prepares it under a new fingerprint."""
    env = {"AUTORESEARCH_CACHE": str(tmp_path)}
    assert run_python("prepare.py", "--source", "builtin", env=env).returncode == 0
    path = tmp_path / "prepared" / "cpu" / "prepared.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "stream_rule"} | {"fingerprint": "builtin:0ld0ld0ld0ld"}))

    refused = run_python("train.py", env=env)
    assert "prepared for another training-stream order; run python prepare.py again" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.returncode != 0

    again = run_python("prepare.py", "--source", "builtin", env=env)
    assert again.returncode == 0 and "re-preparing it (fingerprint builtin:0ld0ld0ld0ld changes" in again.stdout
    redone = json.loads(path.read_text())
    assert redone["stream_rule"] == prepare.STREAM_RULE and redone["fingerprint"] == manifest["fingerprint"]


# ---------------------------------------------------------------------------
# The static check, the second line
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, expected", [
    (LOADER_CALL, f"(lambda mk: mk)({LOADER_CALL.split('(')[0]})" + LOADER_CALL[len("make_dataloader"):],
     "uses make_dataloader other than by calling it"),
    (LOADER_CALL, "mk = make_dataloader\n    train_loader = mk" + LOADER_CALL[len("make_dataloader"):].replace('"train"', '"val"'),
     "uses make_dataloader other than by calling it"),
    (LOADER_CALL, 'functools.partial(make_dataloader, split="val")(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, device=DEVICE)',
     "uses make_dataloader other than by calling it"),
    (LOADER_CALL, LOADER_CALL.replace('"train"', '"".join(["v", "a", "l"])'),
     "calls make_dataloader with split ''.join(['v', 'a', 'l'])"),
    ("make_dataloader)", "make_dataloader as loader)", "calls make_dataloader with split 'val'"),
    ("metrics = evaluate(step_model, tokenizer, EVAL_BATCH_SIZE, device=DEVICE)",
     'metrics = evaluate(step_model, tokenizer, EVAL_BATCH_SIZE, device=DEVICE, split="test")',
     "calls evaluate with a split"),
    ("def main():\n", 'def main():\n    os.popen("python -c 0")\n', "calls os.popen(), which runs another program"),
    ("def main():\n", 'def main():\n    path = "test.parquet"\n', "mentions 'test.parquet'"),
])
def test_the_static_check_names_the_spellings_it_can_see(old, new, expected):
    source = TRAIN_PY.replace(old, new, 1)
    if "as loader" in new:
        source = source.replace(LOADER_CALL, "loader" + LOADER_CALL[len("make_dataloader"):].replace('"train"', '"val"'))
    assert source != TRAIN_PY
    problems = static_problems(source)
    assert any(expected in p for p in problems), problems


def test_the_static_check_passes_train_py_and_the_unigram_stand_in():
    assert static_problems(TRAIN_PY) == []
    assert static_problems(UNIGRAM_TRAIN.read_text()) == []  # its read of val is one the check cannot see


# ---------------------------------------------------------------------------
# The val-vs-test rule
# ---------------------------------------------------------------------------

def test_gap_noise_is_the_stdev_of_the_log_val_test_ratio_with_a_floor():
    baselines = [(3.0, 3.0), (3.0 * math.exp(0.01), 3.0), (3.0 * math.exp(0.02), 3.0)]  # log gaps 0, 0.01, 0.02
    assert gap_noise(baselines) == pytest.approx(0.01)
    assert gap_noise([(3.0, 2.9), (6.0, 5.8)]) == GAP_NOISE_FLOOR  # same ratio: no noise measured
    assert gap_noise([(3.0, 2.9)]) == GAP_NOISE_FLOOR  # one baseline measures nothing
    assert gap_noise([], floor=0.02) == 0.02


def scaled(pair: tuple[float, float], val_gain: float, test_gain: float) -> tuple[float, float]:
    """The (val_bpb, test_bpb) of a candidate with these relative gains (in log bpb) over pair."""
    return pair[0] * math.exp(-val_gain), pair[1] * math.exp(-test_gain)


BEST = (3.3, 3.2)


@pytest.mark.parametrize("val_gain, test_gain, noise, k, refused", [
    (0.05, 0.05, 0.01, 2.0, False),   # matched
    (0.05, 0.08, 0.01, 2.0, False),   # test gains more
    (0.05, 0.023, 0.01, 2.0, False),  # short by 0.027 < 2 x sqrt(2) x 0.01 = 0.0283 (two runs' gaps)
    (0.05, 0.021, 0.01, 2.0, True),   # short by 0.029 > 0.0283
    (0.05, -0.02, 0.01, 2.0, True),   # test got worse
    (0.05, 0.021, 0.01, 3.0, False),  # a larger k forgives more
])
def test_the_val_test_rule_refuses_a_val_gain_test_does_not_match(val_gain, test_gain, noise, k, refused):
    candidate = scaled(BEST, val_gain, test_gain)
    problem = val_test_problem(BEST, candidate, noise, k)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(
            f"val-vs-test: val_bpb improved by {BEST[0] - candidate[0]:.4f} (log ratio {val_gain:.4f}) but test_bpb by "
            f"{BEST[1] - candidate[1]:.4f} (log ratio {test_gain:.4f}), more than {k:g} x sqrt(2) x {noise:.4f} "), problem


def test_a_gain_in_proportion_on_both_splits_passes_however_large():
    """val and test differ in bpb, so an honest change that scales both alike differs in absolute gain."""
    for factor in (0.99, 0.9, 0.5):
        assert val_test_problem(BEST, (BEST[0] * factor, BEST[1] * factor), GAP_NOISE_FLOOR, 2.0) is None


# ---------------------------------------------------------------------------
# Through the loop: test_bpb for every baseline and keep; a fit on val refused, on train kept
# ---------------------------------------------------------------------------

def test_the_loop_scores_test_and_refuses_a_val_gain_that_test_does_not_match(make_project):
    project: Project = make_project(UNIGRAM_TRAIN)
    backlog = project.backlog(("UNIVAL-1", 'UNIGRAM_DATA = "val"'), ("UNITRAIN-1", 'UNIGRAM_DATA = "train"'))

    result = project.loop("--tag", TAG, "--backlog", backlog, *FAST, timeout=600)  # four runs, four verifications

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("UNIVAL-1", "invalid"), ("UNITRAIN-1", "keep")], rows
    baselines, cheat, honest = rows[:2], rows[2], rows[3]
    for row in rows:
        assert float(row["test_bpb"]) > 0, row  # every baseline and every would-be keep is scored on test
    noise = gap_noise([(float(r["val_bpb"]), float(r["test_bpb"])) for r in baselines])
    best = (float(baselines[0]["val_bpb"]), float(baselines[0]["test_bpb"]))
    reason = re.fullmatch(r"val-vs-test: val_bpb improved by ([\d.]+) \(log ratio [\d.]+\) but test_bpb by ([\d.]+) "
                          r"\(log ratio [\d.]+\), more than 2 x sqrt\(2\) x ([\d.]+) \(the baselines' log val/test gap noise\) short; "
                          r"the gain on val does not carry to test \(the judge would have kept it: .*\)", cheat["reason"])
    assert reason, cheat["reason"]
    assert float(reason.group(1)) == pytest.approx(best[0] - float(cheat["val_bpb"]), abs=2e-4)
    assert float(reason.group(2)) == pytest.approx(best[1] - float(cheat["test_bpb"]), abs=2e-4)
    assert float(reason.group(3)) == pytest.approx(noise, abs=1e-4)
    assert math.log(best[0] / float(cheat["val_bpb"])) > math.log(best[1] / float(cheat["test_bpb"])) + 0.05
    honest_gains = math.log(best[0] / float(honest["val_bpb"])), math.log(best[1] / float(honest["test_bpb"]))
    assert honest_gains[0] > 0.1 and honest_gains[1] > honest_gains[0] - 2 * noise
    assert project.branch() == project.sha(honest["commit"])
    for run in ("001-baseline", "002-baseline"):
        log = (project.runs / run / "verify.log").read_text()
        verified = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
        assert {"val_bpb", "test_bpb", "val_seconds", "test_seconds"} <= set(verified)


def test_train_py_that_asks_for_val_through_a_partial_with_a_computed_name_stops_at_the_loader(run_python, tmp_path,
                                                                                               prepared_builtin):
    """The static check would refuse this train.py before the loop runs it; run directly, the loader refuses it."""
    from test_adversarial import VAL_COMPUTED
    from test_guard import edited

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO_ROOT / "prepare.py", work / "prepare.py")
    (work / "train.py").write_text(edited(TRAIN_PY, VAL_COMPUTED))
    result = run_python("train.py", cwd=work, env={"AUTORESEARCH_TIME_BUDGET": "1"})
    assert result.returncode != 0 and "step 00000" not in result.stdout
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last == ("ValueError: make_dataloader serves only the 'train' and 'meta' splits, not 'val'; "
                    "val and test are read only by the fixed evaluation (evaluate).")
