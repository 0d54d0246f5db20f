"""Types every router module shares, free of protobuf (the servicer converts at the edge)."""

from __future__ import annotations

from dataclasses import dataclass

from loopline.errors import InvalidInput

__all__ = ["CHAMPION", "ModelRef"]

CHAMPION = "champion"


@dataclass(frozen=True)
class ModelRef:
    """A registered model and, at most, one of a version or an alias.

    Neither set means "whatever the model's public name routes to": its running experiment, or
    its `champion` alias. `target` is what a worker's `model_version` field takes: workers accept
    a version number or an alias there. In an answer both are set: the concrete version that
    served, and the alias it was resolved through; `requested` builds (and checks) a request's.
    """

    name: str
    version: str = ""
    alias: str = ""

    @classmethod
    def requested(cls, name: str, version: str = "", alias: str = "") -> ModelRef:
        """A reference from a caller: at most one of version and alias."""
        ref = cls(name, version, alias)
        ref.check()
        return ref

    def check(self) -> None:
        """Refuse a version and an alias together (which one would the caller mean?)."""
        if self.version and self.alias:
            raise InvalidInput(
                f"model '{self.name}': set a version ({self.version}) or an alias "
                f"({self.alias}), not both",
                model=self.name,
            )

    @property
    def pinned(self) -> bool:
        """True when a version or an alias is named (experiments do not apply)."""
        return bool(self.version or self.alias)

    @property
    def target(self) -> str:
        """The worker-side `model_version`: the version, else the alias, else champion."""
        return self.version or self.alias or CHAMPION

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}/{self.version}"
        return f"{self.name}@{self.target}"
