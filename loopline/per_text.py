"""Per-text request parameters: how one worker call carries several callers' texts.

A ModelInfer parameter such as `request_id` or `user_bucket` holds one value for the whole call.
Its plural (`request_ids`, `user_buckets`) is a JSON list of strings, one per text, and wins
when it has exactly one entry per text. Routers send plurals for a ClassifyBatch and for single
Classify calls merged under load (services/router/coalesce.py); workers write each text's value
into its inference record. A service never imports another, so the contract lives here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["listed", "request_ids", "user_buckets"]


def listed(params: Mapping[str, str], name: str, count: int) -> list[str] | None:
    """`params[name]` as a list of `count` strings; None when absent, malformed or miscounted."""
    raw = params.get(name, "")
    if not raw:
        return None
    try:
        values = json.loads(raw)
    except ValueError:
        return None
    if (
        isinstance(values, list)
        and len(values) == count
        and all(isinstance(v, str) for v in values)
    ):
        return values
    return None


def request_ids(params: Mapping[str, str], request_id: str, count: int) -> list[str]:
    """One id per text: `request_ids` when it fits, else `request_id` for a single text and
    `<request_id>:<index>` for several."""
    ids = listed(params, "request_ids", count)
    if ids is not None:
        return ids
    if count == 1:
        return [request_id]
    return [f"{request_id}:{index}" for index in range(count)]


def user_buckets(params: Mapping[str, str], count: int) -> list[str]:
    """One user bucket per text: `user_buckets` when it fits, else `user_bucket` ("" = none)."""
    return listed(params, "user_buckets", count) or [params.get("user_bucket", "")] * count
