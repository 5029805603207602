"""The exceptions the command line turns into a one-line message and an exit code."""


class UserError(Exception):
    """A mistake the user can fix: bad input, a missing file, an impossible option."""


class Stopped(Exception):
    """A signal asked the run to stop (`signum`); raised where training checks for one."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
