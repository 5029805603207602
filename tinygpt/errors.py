"""The exceptions the command line turns into a one-line message and an exit code, and the
operating system's reason behind a failure."""


class UserError(Exception):
    """A mistake the user can fix: bad input, a missing file, an impossible option."""


class Stopped(Exception):
    """A signal asked the run to stop (`signum`); raised where training checks for one."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def first_line(e: BaseException) -> str:
    """The first line of `e`'s message (torch's often run to a page), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def os_reason(e: BaseException) -> str:
    """The operating-system reason behind `e` ('No space left on device'), searching the
    exceptions it was raised from: torch reports a failed write as a RuntimeError caused by one."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    return str(e)
