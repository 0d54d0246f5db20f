"""Feedback intake: true labels of earlier requests, appended to the Redis stream the monitor and
the trainer read (`loopline:feedback` by default).

Stream fields: `request_id`, `label`, `user_id`, `source`, `metadata` (compact JSON), `time` (unix
seconds), `received` (unix seconds at the router). The entry id is the feedback id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from loopline.errors import InvalidInput, NotReady
from loopline.logging import get_logger

__all__ = ["FeedbackLog"]

log = get_logger(__name__)

MAX_LABEL_CHARS = 256


class FeedbackLog:
    """Validates a label against the labels the served models know, then XADDs it.

    `known_labels` returns the labels of every model version the router can reach. Labels seen
    once are remembered, so feedback keeps being checked while workers restart. Before any model
    was ever seen the router cannot tell a wrong label from a right one; it accepts the label and
    logs that it could not check it, because refusing would lose real labels.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        stream: str,
        maxlen: int,
        known_labels: Callable[[], Awaitable[set[str]]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._stream = stream
        self._maxlen = maxlen
        self._known_labels = known_labels
        self._seen: set[str] = set()
        self._clock = clock

    async def labels(self) -> set[str]:
        """Every label seen so far, refreshed from the served models."""
        try:
            self._seen |= await self._known_labels()
        except Exception as err:  # a worker down must not stop feedback intake
            log.warning("could not refresh model labels", extra={"error": repr(err)})
        return self._seen

    async def append(
        self,
        request_id: str,
        label: str,
        *,
        user_id: str = "",
        source: str = "",
        metadata: Mapping[str, str] | None = None,
        observed_at: float | None = None,
    ) -> str:
        """Store one label; returns the feedback id (the stream entry id)."""
        await self._check(request_id, label)
        now = self._clock()
        fields: dict[FieldT, EncodableT] = {
            "request_id": request_id,
            "label": label,
            "user_id": user_id,
            "source": source,
            "metadata": json.dumps(dict(metadata or {}), separators=(",", ":")),
            "time": f"{observed_at if observed_at is not None else now:.6f}",
            "received": f"{now:.6f}",
        }
        try:
            entry = await self._client.xadd(
                self._stream, fields, maxlen=self._maxlen, approximate=True
            )
        except (RedisError, OSError) as err:
            raise NotReady(
                f"feedback store (Redis) is unreachable ({type(err).__name__}); retry shortly",
                stream=self._stream,
            ) from err
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def _check(self, request_id: str, label: str) -> None:
        if not request_id.strip():
            raise InvalidInput("request_id is empty: send the id of the classification")
        if not label.strip() or len(label) > MAX_LABEL_CHARS:
            raise InvalidInput(f"label must be 1 to {MAX_LABEL_CHARS} characters", field="label")
        known = await self.labels()
        if not known:
            log.warning("feedback label not checked: no model labels known yet")
            return
        if label not in known:
            raise InvalidInput(
                f"unknown label {label!r}; the served models know: {', '.join(sorted(known))}",
                field="label",
            )
