"""ExperimentBranch and require_clean against real git repositories in temp dirs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.branch import (
    BadTag,
    DirtyCheckout,
    ExperimentBranch,
    NotARepository,
    NothingChanged,
    WorktreeConflict,
    require_clean,
)
from agent.stops import UserError

TRAIN = "".join(f"LINE_{i} = {i}\n" for i in range(10))
PREPARE = "VOCAB = 8192\n"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Researcher")
    git(root, "config", "user.email", "researcher@example.com")
    (root / "train.py").write_text(TRAIN)
    (root / "prepare.py").write_text(PREPARE)
    (root / "notes.txt").write_text("draft\n")
    git(root, "add", "train.py", "prepare.py")
    git(root, "commit", "-q", "-m", "initial")
    # The user's own work in progress, which the loop must leave exactly as it is.
    (root / "notes.txt").write_text("draft, edited\n")
    git(root, "add", "notes.txt")
    (root / "scratch.txt").write_text("untracked\n")
    return root


def user_state(root: Path) -> tuple[str, str, str, str]:
    return (
        git(root, "status", "--porcelain"),
        git(root, "symbolic-ref", "HEAD"),
        git(root, "rev-parse", "HEAD"),
        git(root, "diff", "--cached"),
    )


def test_open_branches_from_head_without_touching_the_user_checkout(repo: Path) -> None:
    before = user_state(repo)
    branch = ExperimentBranch.open(repo, "nov28")

    assert branch.created
    assert branch.branch == "autoresearch/nov28"
    assert branch.path == (repo / "worktrees" / "nov28").resolve()
    assert branch.head() == git(repo, "rev-parse", "HEAD")
    assert git(branch.path, "symbolic-ref", "HEAD") == "refs/heads/autoresearch/nov28"
    assert (branch.path / "train.py").read_text() == TRAIN
    assert user_state(repo) == before
    assert (repo / "notes.txt").read_text() == "draft, edited\n"


def test_commit_advances_the_branch_only(repo: Path) -> None:
    user_head = git(repo, "rev-parse", "HEAD")
    branch = ExperimentBranch.open(repo, "t1")
    base = branch.head()
    edited = TRAIN.replace("LINE_3 = 3\n", "LINE_3 = 33\n")

    sha = branch.commit("MM-1: raise line three", {"train.py": edited})

    assert sha == branch.head() != base
    assert git(repo, "rev-parse", "autoresearch/t1") == sha
    assert git(repo, "rev-parse", f"{sha}^") == base
    assert git(repo, "log", "-1", "--format=%s|%an <%ae>|%cn <%ce>", sha) == (
        "MM-1: raise line three|autoresearch <autoresearch@localhost>|autoresearch <autoresearch@localhost>"
    )
    assert branch.read() == edited
    assert branch.read(commit=base) == TRAIN
    assert branch.read("prepare.py") == PREPARE
    assert git(repo, "rev-parse", "HEAD") == user_head
    assert (repo / "train.py").read_text() == TRAIN
    assert branch.changed_paths(base, sha) == ["train.py"]


def test_commit_refuses_no_change_and_multiline_messages(repo: Path) -> None:
    branch = ExperimentBranch.open(repo, "t1")
    base = branch.head()
    with pytest.raises(NothingChanged):
        branch.commit("MM-1: nothing", {"train.py": TRAIN})
    with pytest.raises(ValueError, match="one non-empty line"):
        branch.commit("MM-1: two\nlines", {"train.py": TRAIN + "X = 1\n"})
    assert branch.head() == base


def test_discard_keeps_the_commit_under_a_ref_and_resets_the_worktree(repo: Path) -> None:
    branch = ExperimentBranch.open(repo, "t1")
    best = branch.head()
    sha = branch.commit("NS-2: fewer steps", {"train.py": TRAIN + "MUON_NS_STEPS = 3\n"})
    (branch.path / "checkpoint.tmp").write_text("left behind by the run\n")

    ref = branch.keep_ref(sha, "NS-2")
    branch.reset(best)

    assert ref == "refs/autoresearch/t1/NS-2"
    assert git(repo, "rev-parse", ref) == sha
    assert branch.head() == best == git(repo, "rev-parse", "autoresearch/t1")
    assert (branch.path / "train.py").read_text() == TRAIN
    assert not (branch.path / "checkpoint.tmp").exists()
    assert "MUON_NS_STEPS = 3" in git(repo, "show", sha)
    with pytest.raises(ValueError):
        branch.keep_ref(sha, "../escape")


def test_amend_rewrites_the_experiment_commit(repo: Path) -> None:
    branch = ExperimentBranch.open(repo, "t1")
    base = branch.head()
    first = branch.commit("MB-1: bigger batch", {"train.py": TRAIN + "BATCH = 64\n"})

    repaired = branch.amend("MB-1: bigger batch (repaired)", {"train.py": TRAIN + "BATCH = 48\n"})

    assert repaired != first
    assert git(repo, "rev-parse", f"{repaired}^") == base
    assert git(repo, "log", "-1", "--format=%s|%an", repaired) == "MB-1: bigger batch (repaired)|autoresearch"
    assert branch.read() == TRAIN + "BATCH = 48\n"
    with pytest.raises(NothingChanged):
        branch.amend("MB-1: undo everything", {"train.py": TRAIN})


def test_line_changes_match_a_hand_counted_edit(repo: Path) -> None:
    branch = ExperimentBranch.open(repo, "t1")
    base = branch.head()
    lines = TRAIN.splitlines(keepends=True)
    # Replace line 2 (1 added, 1 removed), delete lines 5 and 6 (2 removed), append 3 lines.
    edited = lines[:2] + ["LINE_2 = 22\n"] + lines[3:5] + lines[7:] + ["A = 1\n", "B = 2\n", "C = 3\n"]
    sha = branch.commit("ABL-1: edit", {"train.py": "".join(edited)})

    assert branch.line_changes(base, sha) == (4, 3)
    assert branch.line_changes(base, sha, "prepare.py") == (0, 0)


def test_require_clean_refuses_each_kind_of_dirty_checkout(repo: Path) -> None:
    require_clean(repo)

    (repo / "train.py").write_text(TRAIN + "X = 1\n")
    with pytest.raises(DirtyCheckout, match=r"^train\.py has uncommitted changes in .*commit or stash them"):
        require_clean(repo)

    git(repo, "add", "train.py")
    (repo / "train.py").write_text(TRAIN)
    with pytest.raises(DirtyCheckout, match="train.py has uncommitted changes"):
        require_clean(repo)
    git(repo, "reset", "-q", "train.py")
    require_clean(repo)

    (repo / "extra.py").write_text("pass\n")
    with pytest.raises(DirtyCheckout, match=r"^extra\.py is not committed in .*add and commit it"):
        require_clean(repo, ("train.py", "extra.py"))
    assert issubclass(DirtyCheckout, UserError)


def test_not_a_repository_and_empty_repository(tmp_path: Path) -> None:
    with pytest.raises(NotARepository, match="is not a git repository"):
        require_clean(tmp_path)
    git(tmp_path, "init", "-q")
    with pytest.raises(NotARepository, match="has no commit yet"):
        ExperimentBranch.open(tmp_path, "t1")


@pytest.mark.parametrize("tag", ["", "-x", ".x", "a b", "a/b", "a..b", "x.lock", "nov~1"])
def test_bad_tags_are_refused(repo: Path, tag: str) -> None:
    with pytest.raises(BadTag, match="cannot name a git branch"):
        ExperimentBranch.open(repo, tag)


def test_reopen_resumes_on_the_same_branch(repo: Path) -> None:
    first = ExperimentBranch.open(repo, "t1")
    sha = first.commit("MM-1: edit", {"train.py": TRAIN + "X = 1\n"})

    again = ExperimentBranch.open(repo, "t1")

    assert not again.created
    assert again.path == first.path
    assert again.head() == sha


def test_deleted_worktree_is_re_added_on_the_existing_branch(repo: Path) -> None:
    first = ExperimentBranch.open(repo, "t1")
    sha = first.commit("MM-1: edit", {"train.py": TRAIN + "X = 1\n"})
    shutil.rmtree(first.path)

    again = ExperimentBranch.open(repo, "t1")

    assert not again.created
    assert again.head() == sha
    assert (again.path / "train.py").read_text() == TRAIN + "X = 1\n"
    assert git(again.path, "symbolic-ref", "HEAD") == "refs/heads/autoresearch/t1"


def test_a_foreign_directory_in_the_way_is_refused(repo: Path) -> None:
    (repo / "worktrees" / "t1").mkdir(parents=True)
    with pytest.raises(WorktreeConflict, match="is not a git worktree"):
        ExperimentBranch.open(repo, "t1")
