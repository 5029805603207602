"""The one exception type the command line turns into a one-line message."""


class UserError(Exception):
    """A mistake the user can fix: bad input, a missing file, an impossible option."""
