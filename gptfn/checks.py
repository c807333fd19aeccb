"""Type checks for arguments: Python's ``bool`` is an ``int`` (``True`` would pass as 1), so
"an int" and "a number" here exclude it."""

from typing import Any


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
