"""The integrity guard: the metric stays out of the agent's reach.

An agent rewarded for a lower val_bpb will find every way to get one, honest or not. The guard
refuses or invalidates runs that could fake, leak or stretch their way to a keep:
  - scope: an experiment's commit changes train.py and nothing else;
  - files: prepare.py and the prepared data match the fingerprints pinned when the loop started,
    before and after every run (a run can write files);
  - static checks on train.py before it runs: no route to the validation split or the evaluation's
    internals, no override of the AUTORESEARCH_* settings or prepare's constants, no tampering with
    the functions the metric uses;
  - time: the runner's own clock, not the summary, says how long a run trained;
  - before a keep: the checkpoint re-evaluated in a fresh process by prepare.evaluate must give the
    reported val_bpb, and changing future tokens must not move earlier logits (causality probe);
  - val against test: the same process scores the checkpoint on test, which the search never selects
    on; a val gain that test does not match (beyond the noise of the baselines' val-test gap) is
    refused, because train.py is arbitrary code and could read val by a route no check above names.
Each check returns None or one line naming the check and its numbers; a failure makes the run
`invalid` with that line as its reason.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import statistics
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.runner import RunOutcome

ALLOWED_FROM_PREPARE = frozenset({
    "MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "VOCAB_SIZE", "PRESET", "PRESETS",
    "Tokenizer", "make_dataloader", "evaluate", "data_fingerprint", "PrepareError",
})
TRAINING_SPLITS = frozenset({"train", "meta"})
FORBIDDEN_MODULES = frozenset({
    "importlib", "ctypes", "builtins", "inspect", "subprocess", "shutil", "glob", "socket",
    "urllib", "http", "requests", "pyarrow", "pandas", "datasets", "pickle",
})
FORBIDDEN_CALLS = frozenset({"exec", "eval", "compile", "__import__", "globals", "vars", "delattr"})
FORBIDDEN_STRINGS = ("val.parquet", "test.parquet", "prepared.json", "token_bytes.pt", "shard_06542", "shard_06541",
                     "AUTORESEARCH_CACHE")
# Ways to run another program, which could read the data with no name the check would see.
PROGRAM_RUNNING_CALLS = frozenset({"os.system", "os.popen", "os.posix_spawn", "os.posix_spawnp"})
PROGRAM_RUNNING_PREFIXES = ("os.exec", "os.spawn")
# The val-vs-test rule's noise (of log val_bpb - log test_bpb) is never taken below this: two
# baselines can agree by chance, and one measures nothing. 0.002 is 0.2 %, ~0.006 bpb at 3 bpb.
GAP_NOISE_FLOOR = 0.002
# Attribute assignments on these are tuning knobs, not tampering.
TUNABLE_ATTRIBUTE_ROOTS = ("torch.backends.", "torch._dynamo.config.", "torch._inductor.config.",
                           "torch._functorch.config.")
ENVIRONMENT_WRITES = frozenset({"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"})
FILE_CHANGING_CALLS = frozenset({"os.remove", "os.rename", "os.replace", "os.unlink", "os.rmdir", "os.chmod",
                                 "os.truncate", "os.open", "os.write", "os.fdopen", "io.open"})
# Reaching these rewrites what other code does: attribute hooks, operator overrides, module internals.
FORBIDDEN_ATTRIBUTES = frozenset({"__dict__", "__globals__", "__builtins__", "__code__", "__setattr__",
                                  "__delattr__", "library"})


def _dotted(node: ast.AST) -> str | None:
    """'os.environ.get' for an Attribute/Name chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _targets(node: ast.AST) -> Iterable[ast.AST]:
    if isinstance(node, (ast.Assign,)):
        for target in node.targets:
            yield from _flatten(target)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        yield from _flatten(node.target)
    elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        yield from _flatten(node.target)
    elif isinstance(node, (ast.With, ast.AsyncWith)):
        for item in node.items:
            if item.optional_vars is not None:
                yield from _flatten(item.optional_vars)
    elif isinstance(node, ast.NamedExpr):
        yield node.target


def _flatten(target: ast.AST) -> Iterable[ast.AST]:
    if isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _flatten(element)
    elif isinstance(target, ast.Starred):
        yield from _flatten(target.value)
    else:
        yield target


def _module_level(tree: ast.Module) -> Iterable[ast.AST]:
    """Nodes that run in the module's own scope (not inside functions or classes)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _local_uses(tree: ast.Module, names: set[str]) -> set[int]:
    """ids of the Name nodes, among names, inside a function that binds that name itself (a local variable)."""
    ids = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = list(ast.walk(function))
            bound = {n.id for n in inner if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            bound |= {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
            ids |= {id(n) for n in inner if isinstance(n, ast.Name) and n.id in names & bound}
    return ids


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def static_problems(source: str) -> list[str]:
    """What in train.py's source could reach the metric; empty when it is clean."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"train.py does not parse: line {e.lineno}: {e.msg}"]
    problems: list[str] = []
    from_prepare: set[str] = set()
    loaders: set[str] = {"make_dataloader"}  # the names make_dataloader is bound to
    evaluators: set[str] = {"evaluate"}
    modules: set[str] = set()  # names bound to imported modules
    evaluate_calls = 0

    def flag(node: ast.AST, text: str) -> None:
        problems.append(f"line {getattr(node, 'lineno', '?')}: {text}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                modules.add(alias.asname or root)
                if root == "prepare":
                    flag(node, "imports the prepare module object; use `from prepare import <name>`")
                elif root in FORBIDDEN_MODULES:
                    flag(node, f"imports {alias.name}, which train.py has no use for but a metric hack does")
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            if root == "prepare":
                for alias in node.names:
                    if alias.name not in ALLOWED_FROM_PREPARE:
                        flag(node, f"imports prepare.{alias.name}, an internal of the data or the evaluation")
                    from_prepare.add(alias.asname or alias.name)
                    {"make_dataloader": loaders, "evaluate": evaluators}.get(alias.name, set()).add(alias.asname or alias.name)
            elif root in FORBIDDEN_MODULES:
                flag(node, f"imports from {node.module}, which train.py has no use for but a metric hack does")
            else:
                modules.update(alias.asname or alias.name for alias in node.names
                               if alias.name in ("functional", "nn", "environ", "path"))
    for node in _module_level(tree):
        for target in _targets(node):
            if isinstance(target, ast.Name) and target.id in from_prepare:
                flag(node, f"rebinds {target.id}, a constant or function of prepare.py")
    docstrings = _docstrings(tree)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    shadowed = _local_uses(tree, loaders | evaluators)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in loaders | evaluators \
                and id(node) not in called | shadowed:
            flag(node, f"uses {node.id} other than by calling it (an alias or a partial hides the split); "
                       f"call it directly")
        if isinstance(node, ast.Global):
            for name in set(node.names) & from_prepare:
                flag(node, f"declares {name} global, to rebind a constant or function of prepare.py")
        for target in _targets(node):
            if isinstance(target, (ast.Attribute, ast.Subscript)):
                name = _dotted(target.value if isinstance(target, ast.Subscript) else target) or ""
                root = name.split(".")[0]
                if name.startswith("os.environ") or name == "environ":
                    flag(node, "writes os.environ; the AUTORESEARCH_* settings are the harness's")
                elif isinstance(target, ast.Attribute) and (root in modules or root in from_prepare) \
                        and not name.startswith(TUNABLE_ATTRIBUTE_ROOTS):
                    flag(node, f"assigns {name}, an attribute of an imported module")
        if isinstance(node, ast.Call):
            base = node.func.attr if isinstance(node.func, ast.Attribute) else _dotted(node.func) or ""
            func = _dotted(node.func) or f"<...>.{base}"
            if func in FORBIDDEN_CALLS:
                flag(node, f"calls {func}()")
            elif func in PROGRAM_RUNNING_CALLS or func.startswith(PROGRAM_RUNNING_PREFIXES):
                flag(node, f"calls {func}(), which runs another program")
            elif func in ("os.putenv", "os.unsetenv") or (func.startswith("os.environ.") and base in ENVIRONMENT_WRITES):
                flag(node, f"calls {func}(); the AUTORESEARCH_* settings are the harness's")
            elif func in ("setattr", "getattr") and len(node.args) >= 2 and not isinstance(node.args[1], ast.Constant):
                flag(node, f"calls {func}() with a computed attribute name")
            elif func == "setattr" and node.args and (_dotted(node.args[0]) or "").split(".")[0] in modules | from_prepare:
                flag(node, "calls setattr() on an imported module")
            elif base in ("write_text", "write_bytes") or func in FILE_CHANGING_CALLS:
                flag(node, f"calls {func}(), which changes files")
            elif base == "open" and _opens_for_writing(node, method=func != "open"):
                flag(node, "opens a file for writing; a run may only write its checkpoint (torch.save)")
            elif base in loaders:
                split = node.args[3] if len(node.args) >= 4 else next((k.value for k in node.keywords if k.arg == "split"), None)
                if not (isinstance(split, ast.Constant) and split.value in TRAINING_SPLITS):
                    shown = ast.unparse(split) if split is not None else "nothing"
                    flag(node, f"calls make_dataloader with split {shown}; training may read only 'train' or 'meta'")
            elif base in evaluators:
                evaluate_calls += 1
                if len(node.args) > 4 or any(k.arg in ("split", None) for k in node.keywords):
                    flag(node, "calls evaluate with a split; train.py's one evaluation is of val, by default")
        if isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN_ATTRIBUTES and (node.attr != "library" or _dotted(node.value) == "torch") \
                    or node.attr == "modules" and _dotted(node.value) == "sys":
                flag(node, f"reaches {ast.unparse(node)}, a way around the module boundary")
        if isinstance(node, ast.Name) and node.id in ("__builtins__",):
            flag(node, "reaches __builtins__")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            hit = next((s for s in FORBIDDEN_STRINGS if s in node.value), None)
            if hit:
                flag(node, f"mentions {hit!r}, a path into the prepared data")
    if evaluate_calls > 1:
        problems.append(f"calls evaluate {evaluate_calls} times; one final evaluation is all a run may see of the validation split")
    return problems


def gap_noise(baselines: Iterable[tuple[float, float]], floor: float = GAP_NOISE_FLOOR) -> float:
    """The noise of log(val_bpb / test_bpb) over the baselines' (val_bpb, test_bpb), never below floor.

    The val-vs-test rule compares a val gain with a test gain measured on the same checkpoint, so
    what varies between honest runs is the gap between the two splits, not either split alone. In
    logs, because an honest change scales both splits' bpb alike: a 5 % gain is 5 % on each.
    """
    gaps = [math.log(val / test) for val, test in baselines]
    return max(statistics.stdev(gaps), floor) if len(gaps) >= 2 else floor


def val_test_problem(best: tuple[float, float], candidate: tuple[float, float], noise: float, k: float) -> str | None:
    """The val-vs-test rule on (val_bpb, test_bpb) pairs: the candidate's relative gain on val over best
    must show on test within k x sqrt(2) x noise (in log bpb); else one line with both gains. The shortfall
    is the best's gap minus the candidate's, two runs' gaps that each vary by `noise`: sqrt(2) x noise.
    (Without the sqrt(2), DEMO-1's honest DEPTH = 2, val 0.0578 and test 0.0281 better, was refused.)"""
    val_gain, test_gain = math.log(best[0] / candidate[0]), math.log(best[1] / candidate[1])
    if val_gain > test_gain + k * math.sqrt(2) * noise:
        return (f"val-vs-test: val_bpb improved by {best[0] - candidate[0]:.4f} (log ratio {val_gain:.4f}) but test_bpb by "
                f"{best[1] - candidate[1]:.4f} (log ratio {test_gain:.4f}), more than {k:g} x sqrt(2) x {noise:.4f} "
                f"(the baselines' log val/test gap noise) short; the gain on val does not carry to test")
    return None


def _opens_for_writing(call: ast.Call, method: bool) -> bool:
    """open(path, mode) or path.open(mode): a mode that writes, or one the source does not spell out."""
    position = 0 if method else 1
    mode = call.args[position] if len(call.args) > position else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        return False
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
        return any(c in mode.value for c in "wax+")
    return True  # a computed mode could be anything


def sha256(path: Path) -> str:
    """The same hex digest as `sha256sum path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each file, by path."""
    return {str(path): sha256(Path(path)) for path in paths}


@dataclass
class GuardCosts:
    """Seconds each check has cost so far (for the closing note and bench/guard_cost.py)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, check: str, seconds: float) -> None:
        self.seconds[check] = self.seconds.get(check, 0.0) + seconds
        self.calls[check] = self.calls.get(check, 0) + 1

    def describe(self) -> str:
        return "guard cost: " + ", ".join(f"{check} {self.seconds[check]:.2f} s ({self.calls[check]}x)"
                                          for check in self.seconds)


class Guard:
    """The checks of one loop, with prepare.py, the harness and the data pinned when it starts."""

    def __init__(self, repo_root: Path, worktree: Path, data_files: Iterable[str | Path], *, python: str,
                 env: Mapping[str, str], preset: str, reeval_tolerance: float | None = None,
                 probe_tolerance: float | None = None) -> None:
        self.repo_root = Path(repo_root)
        self.worktree = Path(worktree)
        self.data_files = sorted(Path(p) for p in data_files)
        self.python = python
        self.env = dict(env)
        self.reeval_tolerance = reeval_tolerance if reeval_tolerance is not None else (0.005 if preset == "gpu" else 1e-4)
        self.probe_tolerance = probe_tolerance if probe_tolerance is not None else (1e-3 if preset == "gpu" else 1e-4)
        self.costs = GuardCosts()
        t0 = time.perf_counter()
        self.prepare_sha = sha256(self.repo_root / "prepare.py")
        # The user's checkout holds the code that judges: a run's working directory is inside it.
        self.harness = files_digest([self.repo_root / "prepare.py", *sorted((self.repo_root / "agent").glob("*.py"))])
        self.data = files_digest(self.data_files)
        self.costs.add("pin", time.perf_counter() - t0)

    def _timed(self, check: str, t0: float) -> None:
        self.costs.add(check, time.perf_counter() - t0)

    def check_scope(self, changed_paths: list[str]) -> str | None:
        others = [p for p in changed_paths if p != "train.py"]
        if others:
            return f"scope: the proposal changes {', '.join(others)}; an experiment may change only train.py"
        return None

    def check_source(self, source: str) -> str | None:
        t0 = time.perf_counter()
        problems = static_problems(source)
        self._timed("static", t0)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return f"static check: train.py {problems[0]}{more}"
        return None

    @staticmethod
    def _changes(pinned: Mapping[str, str]) -> list[tuple[str, str, str | None]]:
        """(path, pinned sha256, current sha256 or None when gone) for every file that differs."""
        changes = []
        for path, pinned_sha in pinned.items():
            current = sha256(Path(path)) if Path(path).exists() else None
            if current != pinned_sha:
                changes.append((path, pinned_sha, current))
        return changes

    def check_files(self) -> str | None:
        """prepare.py where the run imports it, the harness in the user's checkout, and the data, against the pins."""
        t0 = time.perf_counter()
        problems = []
        worktree_sha = sha256(self.worktree / "prepare.py")
        if worktree_sha != self.prepare_sha:
            problems.append(f"prepare.py changed (sha256 {self.prepare_sha[:12]} -> {worktree_sha[:12]})")
        for path, before, now in self._changes(self.harness):
            where = Path(path).relative_to(self.repo_root)
            problems.append(f"{where} in your checkout {'is gone' if now is None else 'changed'}"
                            + (f" (sha256 {before[:12]} -> {now[:12]})" if now else ""))
        for path, before, now in self._changes(self.data):
            problems.append(f"the prepared data lost {path}" if now is None else
                            f"the prepared data changed ({Path(path).name}: sha256 {before[:12]} -> {now[:12]})")
        self._timed("files", t0)
        return "files: " + "; ".join(problems) if problems else None

    def data_intact(self) -> bool:
        return not self._changes(self.data)

    def harness_intact(self) -> bool:
        return not self._changes(self.harness)

    @staticmethod
    def check_time(outcome: RunOutcome, budget: float) -> str | None:
        """The runner's clock: progress lines must span no more than the budget plus a small allowance."""
        times = outcome.progress_times
        if len(times) < 2:
            return "time: the run printed fewer than two progress lines, so its training time cannot be measured"
        span = times[-1] - times[0]
        steps = [b - a for a, b in zip(times, times[1:])]
        allowance = max(0.05 * budget, 3 * statistics.median(steps)) + 2.0
        if span > budget + allowance:
            return (f"time: progress lines span {span:.1f} s by the runner's clock, over the {budget:g} s budget "
                    f"+ {allowance:.1f} s allowance")
        reported = outcome.summary.number("training_seconds") if outcome.summary else float("nan")
        if reported + allowance < span:
            return f"time: the summary claims {reported:.1f} s of training but progress lines span {span:.1f} s"
        return None

    def verify(self, run_dir: Path, reported: float) -> tuple[str | None, dict]:
        """Re-evaluate the checkpoint in a fresh process and probe causality; (problem, details)."""
        t0 = time.perf_counter()
        checkpoint = run_dir / "checkpoint.pt"
        try:
            if not checkpoint.exists():
                return f"re-evaluation: no checkpoint at {checkpoint}; train.py must save it to AUTORESEARCH_RUN_DIR", {}
            result = subprocess.run([self.python, str(self.repo_root / "agent" / "verify.py"), str(checkpoint)],
                                    cwd=self.worktree, env=self.env, capture_output=True, text=True)
            (run_dir / "verify.log").write_text(result.stdout + result.stderr)
            if result.returncode != 0:
                last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["no output"]
                return f"re-evaluation: the checkpoint could not be re-evaluated ({last[0][:200]})", {}
            details = json.loads(result.stdout.strip().splitlines()[-1])
        finally:
            self._timed("verify", t0)
        if details["tampered"]:
            return f"re-evaluation: importing train.py replaced {', '.join(details['tampered'])}", details
        if abs(details["val_bpb"] - reported) > self.reeval_tolerance:
            return (f"re-evaluation: the run reported val_bpb {reported:.6f} but its checkpoint re-evaluates to "
                    f"{details['val_bpb']:.6f} (tolerance {self.reeval_tolerance:g})"), details
        if details["probe_max_deviation"] > self.probe_tolerance:
            return (f"causality: changing the tokens after position {details['probe_position']} moved earlier logits by "
                    f"up to {details['probe_max_deviation']:.3g} (tolerance {self.probe_tolerance:g}); the model reads the future"), details
        return None, details
