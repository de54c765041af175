"""One loop per tag: an exclusive lock on runs/<tag>/loop.lock, held by the OS for the loop's life.

The lock is fcntl.flock on an open file, so it goes with the process: exit, Ctrl-C and SIGKILL all
release it and never leave a stale lock behind. The holder writes its PID, start time and command
line into the file, so a second loop can say which loop holds the tag.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from agent.stops import UserError

LOCK_NAME = "loop.lock"
_READ_ATTEMPTS = 20  # the holder writes its record just after it locks: wait up to this many tenths of a second


class TagBusy(UserError):
    """Another loop holds the tag."""


def lock_path(runs_dir: Path) -> Path:
    return Path(runs_dir) / LOCK_NAME


class TagLock:
    """The lock of one tag's runs directory; `acquire` takes it without waiting or raises TagBusy."""

    def __init__(self, runs_dir: Path, tag: str) -> None:
        self.path = lock_path(runs_dir)
        self.tag = tag
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self, command: list[str] | None = None) -> TagLock:
        """Take the lock and write this process's record into it; TagBusy when another process holds it."""
        handle = self._take()
        if handle is None:
            raise TagBusy(f"tag {self.tag} is in use by another loop ({self.holder()}): wait for it to stop, or "
                          f"stop it with Ctrl-C in its terminal (it records what finished), then run this "
                          f"command again.")
        record = {"pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": command if command is not None else [sys.executable, *sys.argv]}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        self._file = handle
        return self

    def _take(self):
        """The locked file, or None when another process holds the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # not truncated: the holder's record stays readable
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def is_held_elsewhere(self) -> bool:
        """Whether another process holds the lock now; only reads an existing lock file."""
        if not self.path.exists():
            return False
        handle = self._take()
        if handle is None:
            return True
        handle.close()
        return False

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the only descriptor of the open file releases the flock
            self._file = None

    def holder(self) -> str:
        """Who holds the lock, in words: 'PID 123, started 2026-12-02 00:41:07 UTC: python agent/loop.py ...'."""
        for _ in range(_READ_ATTEMPTS):
            try:
                record = json.loads(self.path.read_text(encoding="utf-8"))
                started = datetime.fromisoformat(record["started"]).strftime("%Y-%m-%d %H:%M:%S UTC")
                return f"PID {record['pid']}, started {started}: {shlex.join(record['command'])}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.1)
        return f"its PID and start time are not in {self.path} yet"

    def __enter__(self) -> TagLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def busy_tags(runs_root: Path) -> list[str]:
    """Each tag under runs/ whose lock a loop holds now, as 'tag (holder)'."""
    busy = []
    for path in sorted(Path(runs_root).glob(f"*/{LOCK_NAME}")):
        lock = TagLock(path.parent, path.parent.name)
        if lock.is_held_elsewhere():
            busy.append(f"{lock.tag} ({lock.holder()})")
    return busy
