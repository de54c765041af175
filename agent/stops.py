"""The small family of exceptions that end the loop cleanly, each carrying one sentence for the user."""


class LoopStop(Exception):
    """Ends the loop after recording what finished; str(self) is what the user reads."""


class UserError(LoopStop):
    """Something the user can fix before starting (no data, no key, a dirty checkout, a bad backlog)."""
