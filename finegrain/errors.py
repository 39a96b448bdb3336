"""The one exception type for mistakes a user can fix (bad path, bad image, wrong config)."""


class FinegrainError(Exception):
    """A problem the user can fix; the CLI prints its message alone, without a traceback."""
