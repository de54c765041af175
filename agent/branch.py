"""The loop's git branch: its own worktree on `autoresearch/<tag>`, one commit per experiment.

The user's checkout, index and branches are never touched. A kept experiment leaves the branch on
its commit; any other outcome resets the branch to the best commit and keeps the experiment's
commit reachable under `refs/autoresearch/<tag>/<name>`, so every commit in the ledger can be shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import git

from agent.stops import UserError

_REF_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# The loop commits under its own name so that it does not depend on the user's git config.
_IDENTITY = {
    "GIT_AUTHOR_NAME": "autoresearch",
    "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
    "GIT_COMMITTER_NAME": "autoresearch",
    "GIT_COMMITTER_EMAIL": "autoresearch@localhost",
}


class NotARepository(UserError):
    """The loop was pointed at a directory that is not a git checkout with a commit."""


class DirtyCheckout(UserError):
    """train.py or prepare.py differs from HEAD, so branching from HEAD would lose the change."""


class BadTag(UserError):
    """The run tag cannot be part of a git branch name."""


class WorktreeConflict(UserError):
    """The worktree path or the branch is in a state the loop did not leave it in."""


class NothingChanged(ValueError):
    """An experiment's files are identical to what the branch already has."""


def _is_ref_safe(name: str) -> bool:
    return bool(_REF_SAFE.match(name)) and ".." not in name and not name.endswith((".", ".lock"))


def check_tag(tag: str) -> None:
    """Raise BadTag unless `tag` can name the branch autoresearch/<tag> and its refs."""
    if not tag:
        raise BadTag("--tag is empty, and an empty tag cannot name a git branch: give the run a name, e.g. "
                     "--tag nov28 (letters, digits, '-', '_' and '.').")
    if not _is_ref_safe(tag):
        raise BadTag(
            f"the tag {tag!r} cannot name a git branch: use letters, digits, '-', '_' and '.', "
            "not starting with '.' or '-'."
        )


def _user_repo(repo_root: Path) -> git.Repo:
    try:
        repo = git.Repo(repo_root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise NotARepository(
            f"{repo_root} is not a git repository: run the loop from the root of your clone "
            "(or `git init` and commit train.py and prepare.py first)."
        ) from None
    if not repo.head.is_valid():
        raise NotARepository(
            f"{repo_root} has no commit yet: commit train.py and prepare.py, then start the loop "
            "again."
        )
    return repo


def require_clean(repo_root: Path, paths: Iterable[str] = ("train.py", "prepare.py")) -> None:
    """Raise DirtyCheckout unless every path is committed and unchanged in the user's checkout."""
    repo = _user_repo(repo_root)
    tree = repo.head.commit.tree
    for path in paths:
        try:
            tree / path
        except KeyError:
            raise DirtyCheckout(
                f"{path} is not committed in {repo_root}: add and commit it, then start the loop "
                "again (it branches from your HEAD)."
            ) from None
        if repo.git.status("--porcelain", "--", path):
            raise DirtyCheckout(
                f"{path} has uncommitted changes in {repo_root}: commit or stash them, then start "
                "the loop again (it branches from your HEAD)."
            )


def _registered_worktrees(repo: git.Repo) -> dict[Path, str | None]:
    """Worktree path -> the ref it has checked out (None when detached)."""
    worktrees: dict[Path, str | None] = {}
    current: Path | None = None
    for line in repo.git.worktree("list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            current = Path(line.removeprefix("worktree ")).resolve()
            worktrees[current] = None
        elif line.startswith("branch ") and current is not None:
            worktrees[current] = line.removeprefix("branch ")
    return worktrees


def _ignore_in_user_repo(repo: git.Repo, worktrees_dir: Path) -> None:
    """Keep the worktrees out of the user's `git status` when their .gitignore does not already."""
    root = Path(repo.working_tree_dir).resolve()
    try:
        relative = worktrees_dir.resolve().relative_to(root)
    except ValueError:
        return
    if not relative.parts:
        return
    try:
        repo.git.check_ignore("-q", "--no-index", f"{relative.as_posix()}/")
        return
    except git.GitCommandError:
        pass
    exclude = Path(repo.common_dir) / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    existing = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
    separator = "" if not existing or existing.endswith("\n") else "\n"
    exclude.write_text(f"{existing}{separator}/{relative.as_posix()}/\n", encoding="utf-8")


class ExperimentBranch:
    """The branch `autoresearch/<tag>` checked out in the loop's own worktree."""

    def __init__(self, repo: git.Repo, path: Path, tag: str, created: bool) -> None:
        self.repo = repo
        self.path = path
        self.tag = tag
        self.branch = f"autoresearch/{tag}"
        self.created = created

    @classmethod
    def open(cls, repo_root: Path, tag: str, worktrees_dir: Path | None = None) -> ExperimentBranch:
        """The worktree for `tag`, created from the user's HEAD if missing, reused if present."""
        check_tag(tag)
        repo_root = Path(repo_root).resolve()
        user = _user_repo(repo_root)
        worktrees_dir = repo_root / "worktrees" if worktrees_dir is None else Path(worktrees_dir)
        path = (worktrees_dir / tag).resolve()
        branch = f"autoresearch/{tag}"
        branch_exists = any(head.name == branch for head in user.heads)
        checked_out = _registered_worktrees(user)

        if path in checked_out and path.exists():
            if checked_out[path] != f"refs/heads/{branch}":
                raise WorktreeConflict(
                    f"{path} is a worktree that is not on {branch}: remove it with "
                    f"`git worktree remove {path}` or start the loop with another --tag."
                )
            return cls(git.Repo(path), path, tag, created=False)
        if path.exists():
            raise WorktreeConflict(
                f"{path} exists but is not a git worktree: move it away or start the loop with "
                "another --tag."
            )
        user.git.worktree("prune")
        worktrees = _registered_worktrees(user)
        elsewhere = [p for p, ref in worktrees.items() if ref == f"refs/heads/{branch}"]
        if elsewhere:
            raise WorktreeConflict(
                f"{branch} is checked out in {elsewhere[0]}: switch that checkout to another branch "
                "or start the loop with another --tag."
            )
        _ignore_in_user_repo(user, worktrees_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        if branch_exists:
            user.git.worktree("add", str(path), branch)
        else:
            user.git.worktree("add", "-b", branch, str(path), "HEAD")
        return cls(git.Repo(path), path, tag, created=not branch_exists)

    def head(self) -> str:
        """The full sha of the branch's current commit."""
        return self.repo.head.commit.hexsha

    def read(self, path: str = "train.py", commit: str | None = None) -> str:
        """A file's text at `commit` (HEAD when None)."""
        blob = self.repo.commit(commit or "HEAD").tree / path
        return blob.data_stream.read().decode("utf-8")

    def commit(self, message: str, files: Mapping[str, str]) -> str:
        """Write `files` into the worktree and commit only them as one new commit; its sha."""
        self._write(message, files)
        if not self.repo.git.diff("--cached", "--name-only", "HEAD", "--", *files):
            raise NothingChanged(
                f"{', '.join(files)} already match HEAD; there is nothing to commit for {message!r}."
            )
        self._git_commit("-m", message, "--", *files)
        return self.head()

    def amend(self, message: str, files: Mapping[str, str]) -> str:
        """Rewrite HEAD's commit with `files` and `message` (a crash repair); the new sha."""
        self._write(message, files)
        parents = self.repo.head.commit.parents
        if parents and not self.repo.git.diff("--cached", "--name-only", parents[0].hexsha):
            raise NothingChanged(
                f"the repair of {message!r} would undo the whole experiment; there is nothing to commit."
            )
        self._git_commit("--amend", "-m", message, "--", *files)
        return self.head()

    def reset(self, sha: str) -> None:
        """Move the branch and worktree to `sha`, dropping untracked files a run left behind."""
        self.repo.git.reset("--hard", sha)
        self.repo.git.clean("-fd")

    def keep_ref(self, sha: str, name: str) -> str:
        """Keep `sha` reachable under `refs/autoresearch/<tag>/<name>`; the ref's name."""
        if not _is_ref_safe(name):
            raise ValueError(f"{name!r} cannot name a git ref: use letters, digits, '-', '_' and '.'.")
        ref = f"refs/autoresearch/{self.tag}/{name}"
        self.repo.git.update_ref(ref, sha)
        return ref

    def line_changes(self, base: str, sha: str, path: str = "train.py") -> tuple[int, int]:
        """Lines (added, removed) in `path` from `base` to `sha`."""
        added = removed = 0
        for line in self.repo.git.diff("--numstat", base, sha, "--", path).splitlines():
            plus, minus, _ = line.split("\t", 2)
            if plus != "-":
                added += int(plus)
                removed += int(minus)
        return added, removed

    def changed_paths(self, base: str, sha: str) -> list[str]:
        """Every path that differs between `base` and `sha` (a rename counts as both its paths)."""
        return self.repo.git.diff("--name-only", "--no-renames", base, sha).splitlines()

    def _write(self, message: str, files: Mapping[str, str]) -> None:
        if not message.strip() or "\n" in message or "\r" in message:
            raise ValueError(f"a commit message must be one non-empty line, got {message!r}.")
        if not files:
            raise ValueError("a commit needs at least one file.")
        root = self.path.resolve()
        for name, text in files.items():
            target = (root / name).resolve()
            if not target.is_relative_to(root) or target == root:
                raise ValueError(f"{name!r} is outside the worktree {root}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", newline="")
        self.repo.git.add("--", *files)

    def _git_commit(self, *args: str) -> None:
        # No hooks and no signing: the user's hooks and keys are not the loop's to trigger overnight.
        self.repo.git.commit("--no-verify", "--no-gpg-sign", *args, env=_IDENTITY)


@dataclass(frozen=True)
class TagFootprint:
    """What git holds for one tag: its worktree, its branch and the refs that keep its experiments."""

    tag: str
    worktree: Path | None  # registered on the tag's branch at worktrees/<tag>
    branch: str | None     # autoresearch/<tag>, when it exists
    refs: tuple[str, ...]  # refs/autoresearch/<tag>/*
    slot_worktrees: tuple[Path, ...] = ()  # detached at worktrees/<tag>.slot-<gpu> and <tag>.verify (agent/slots.py)

    def describe(self) -> list[str]:
        parts = [f"the worktree {self.worktree}"] if self.worktree else []
        parts += [f"{len(self.slot_worktrees)} slot worktree{'s' if len(self.slot_worktrees) != 1 else ''} beside it"
                  ] if self.slot_worktrees else []
        parts += [f"the branch {self.branch}"] if self.branch else []
        parts += [f"{len(self.refs)} ref{'s' if len(self.refs) != 1 else ''} under refs/autoresearch/{self.tag}/"
                  ] if self.refs else []
        return parts


def tag_footprint(repo_root: Path, tag: str, worktrees_dir: Path | None = None) -> TagFootprint:
    """The tag's worktree, branch and refs; raises WorktreeConflict when removing them would touch the
    user's checkout or a worktree the loop did not make."""
    check_tag(tag)
    repo_root = Path(repo_root).resolve()
    user = _user_repo(repo_root)
    branch = f"autoresearch/{tag}"
    path = ((repo_root / "worktrees" if worktrees_dir is None else Path(worktrees_dir)) / tag).resolve()
    user.git.worktree("prune")
    worktree = None
    for checkout, ref in _registered_worktrees(user).items():
        if checkout == path and ref != f"refs/heads/{branch}":
            raise WorktreeConflict(f"{path} is a worktree that is not on {branch}, so the loop did not make it: "
                                   "remove it yourself if you mean to.")
        if checkout == path:
            worktree = path
        elif ref == f"refs/heads/{branch}":
            raise WorktreeConflict(f"{branch} is checked out in {checkout}: switch that checkout to another "
                                   "branch first; the tag's removal never touches your checkouts.")
    refs = tuple(user.git.for_each_ref("--format=%(refname)", f"refs/autoresearch/{tag}/").split())
    exists = any(head.name == branch for head in user.heads)
    slots = tuple(sorted(checkout for checkout, ref in _registered_worktrees(user).items() if ref is None
                         and checkout.parent == path.parent and checkout.name.startswith((f"{tag}.slot-", f"{tag}.verify"))))
    return TagFootprint(tag, worktree, branch if exists else None, refs, slots)


def remove_tag(repo_root: Path, footprint: TagFootprint) -> None:
    """Remove the worktree, the branch and the refs of `footprint`, in that order."""
    user = _user_repo(Path(repo_root).resolve())
    for slot in footprint.slot_worktrees:
        user.git.worktree("remove", "--force", str(slot))
    if footprint.worktree is not None:
        user.git.worktree("remove", "--force", str(footprint.worktree))  # its files are all committed or run leftovers
    if footprint.branch is not None:
        user.git.branch("-D", footprint.branch)
    for ref in footprint.refs:
        user.git.update_ref("-d", ref)
