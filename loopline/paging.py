"""Page sizes of list calls (`PageRequest.page_size`): one rule for every service, the one the
proto documents."""

from __future__ import annotations

from loopline.errors import InvalidInput

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """Items to return: 0 means the default, more than the cap means the cap; a negative size
    is the caller's mistake."""
    if requested < 0:
        raise InvalidInput(f"page_size {requested} must be >= 0", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
