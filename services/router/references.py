"""Model references against the MLflow registry: does `sentiment@challenger` exist, and which
version is it; point an alias at an experiment's winner.

Only experiment administration calls these, never the classification path: MLflow's client is
synchronous and slow to import, so it is created on first use and called in a thread.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from loopline.errors import InvalidInput
from loopline.logging import get_logger
from services.router.domain import CHAMPION, ModelRef

if TYPE_CHECKING:
    from loopline.registry import Registry

__all__ = ["References"]

log = get_logger(__name__)

PROMOTION_REASON_TAG = "loopline.promotion_reason"


class References:
    """Resolve and promote model versions in one MLflow registry."""

    def __init__(self, mlflow_uri: str) -> None:
        self._uri = mlflow_uri

    @functools.cached_property
    def registry(self) -> Registry:
        from loopline.registry import Registry

        return Registry(self._uri)

    async def resolve(self, ref: ModelRef) -> ModelRef:
        """The concrete version a reference resolves to now; NotFound when it does not resolve
        (unknown model, version or alias)."""
        if not ref.name:
            raise InvalidInput("a variant names no model", field="model.name")
        version = await asyncio.to_thread(self.registry.resolve, ref.name, ref.target)
        return ModelRef(ref.name, version)

    async def promote(self, ref: ModelRef, alias: str, reason: str) -> ModelRef:
        """Point `alias` at the version `ref` resolves to now; champion keeps rollback history."""
        version = await asyncio.to_thread(self.registry.resolve, ref.name, ref.target)
        await asyncio.to_thread(self._promote, ref.name, version, alias or CHAMPION, reason)
        log.info(
            "experiment winner promoted",
            extra={"model": ref.name, "version": version, "alias": alias, "reason": reason},
        )
        return ModelRef(ref.name, version, alias or CHAMPION)

    def _promote(self, name: str, version: str, alias: str, reason: str) -> None:
        self.registry.set_alias(name, alias, version)
        if reason:
            self.registry.describe_version(name, version, PROMOTION_REASON_TAG, reason)
