"""Content-based routing on the real data: Portuguese reviews to `sentiment-pt`, English stays."""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from loopline.errors import InvalidInput
from services.router.language import InvalidRouting, LanguageDetector, LanguageRoutes

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PORTUGUESE = ("portuguese_reviews/train.jsonl", "portuguese_reviews/validation.jsonl")
ENGLISH = ("movie_reviews/validation.jsonl",)
ROUTES = {"sentiment": {"pt": "sentiment-pt"}}


def texts(*names: str) -> list[str]:
    """The texts of ../shared/data files, read at test time (never copied into the repository)."""
    missing = [name for name in names if not (DATA / name).is_file()]
    assert not missing, f"the shared data is not next to the repository: {missing} in {DATA}"
    return [
        json.loads(line)["text"]
        for name in names
        for line in (DATA / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


class CountingDetector:
    """A fake detector that answers a fixed language and counts its calls."""

    def __init__(self, answer: str = "pt", languages: tuple[str, ...] = ("en", "pt")) -> None:
        self.answer = answer
        self.calls = 0
        self._languages = frozenset(languages)

    @property
    def languages(self) -> frozenset[str]:
        return self._languages

    def detect(self, text: str) -> str:
        self.calls += 1
        return self.answer


@pytest.fixture(scope="module")
def routes() -> LanguageRoutes:
    """The configuration the issue describes, with the languages the traffic really has."""
    return LanguageRoutes(ROUTES, languages=("en", "pt"))


def share_routed(routes: LanguageRoutes, batch: list[str], target: str) -> float:
    return sum(routes.route("sentiment", text)[0] == target for text in batch) / len(batch)


def test_portuguese_reviews_go_to_the_portuguese_model(routes: LanguageRoutes) -> None:
    batch = texts(*PORTUGUESE)
    assert len(batch) == 3500
    assert share_routed(routes, batch, "sentiment-pt") >= 0.98


def test_english_movie_reviews_stay_on_the_requested_model(routes: LanguageRoutes) -> None:
    batch = texts(*ENGLISH)
    assert len(batch) == 1000
    assert share_routed(routes, batch, "sentiment") >= 0.98


def test_the_detected_language_comes_back_with_the_model(routes: LanguageRoutes) -> None:
    portuguese, english = texts(PORTUGUESE[1])[0], texts(*ENGLISH)[0]
    assert routes.route("sentiment", portuguese) == ("sentiment-pt", "pt")
    assert routes.route("sentiment", english) == ("sentiment", "en")


def test_models_without_routes_are_not_detected() -> None:
    detector = CountingDetector()
    routes = LanguageRoutes(ROUTES, detector=detector)
    assert routes.route("topics", "o filme é ótimo") == ("topics", "")
    assert routes.route("sentiment-pt", "o filme é ótimo") == ("sentiment-pt", "")
    assert detector.calls == 0
    assert routes.route("sentiment", "o filme é ótimo") == ("sentiment-pt", "pt")
    assert detector.calls == 1


def test_without_any_route_nothing_is_detected() -> None:
    assert LanguageRoutes({}).route("sentiment", "o filme é ótimo") == ("sentiment", "")


def test_a_language_without_a_route_keeps_the_requested_model() -> None:
    routes = LanguageRoutes(ROUTES, detector=CountingDetector(answer="en"))
    assert routes.route("sentiment", "the film was great") == ("sentiment", "en")


def test_codes_and_names_are_normalized() -> None:
    routes = LanguageRoutes(
        {" sentiment ": {" PT ": " sentiment-pt "}}, detector=CountingDetector()
    )
    assert routes.routes == {"sentiment": {"pt": "sentiment-pt"}}


def test_text_without_letters_has_no_language(routes: LanguageRoutes) -> None:
    assert routes.route("sentiment", "12345 !!! :-)") == ("sentiment", "")
    assert routes.route("sentiment", "") == ("sentiment", "")


def test_only_the_head_of_a_long_text_is_read() -> None:
    detector = LanguageDetector(("en", "pt"), max_chars=60)
    text = "o filme é lindo e os atores são ótimos " + "the film was great and long " * 50
    assert detector.detect(text) == "pt"


def test_one_detector_serves_many_threads(routes: LanguageRoutes) -> None:
    batch = texts(PORTUGUESE[1])[:200] + texts(*ENGLISH)[:200]
    serial = [routes.route("sentiment", text) for text in batch]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda text: routes.route("sentiment", text), batch))
    assert threaded == serial


BAD_ROUTES: list[tuple[Mapping[str, Any], str]] = [
    ({"sentiment": {"pt": ""}}, "routes['sentiment']['pt']"),
    ({"sentiment": {"pt": "  "}}, "routes['sentiment']['pt']"),
    ({"": {"pt": "sentiment-pt"}}, "routes"),
    ({"sentiment": {"": "sentiment-pt"}}, "routes['sentiment']"),
    ({"sentiment": {}}, "routes['sentiment']"),
    ({"sentiment": {"es": "sentiment-es"}}, "routes['sentiment']['es']"),
    (
        {"sentiment": {"pt": "sentiment-pt"}, "sentiment-pt": {"en": "sentiment"}},
        "routes['sentiment']['pt']",
    ),
]


@pytest.mark.parametrize(("routes", "field"), BAD_ROUTES)
def test_bad_routes_are_refused_with_the_field_named(
    routes: Mapping[str, Mapping[str, str]], field: str
) -> None:
    with pytest.raises(InvalidRouting) as caught:
        LanguageRoutes(routes, detector=CountingDetector())
    assert caught.value.details["field"] == field
    assert str(caught.value).startswith(f"{field}: ")
    # Both: an InvalidInput for an admin RPC, a ValueError for a settings validator.
    assert isinstance(caught.value, InvalidInput)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("languages", "problem"),
    [
        (("en", "xx"), "unknown language codes"),
        (("pt",), "at least two languages"),
        ("en,pt", "expected a list of codes"),
    ],
)
def test_bad_language_sets_are_refused(languages: Any, problem: str) -> None:
    with pytest.raises(InvalidRouting, match=problem) as caught:
        LanguageDetector(languages)
    assert caught.value.field == "languages"


def test_languages_and_a_detector_are_exclusive() -> None:
    with pytest.raises(InvalidRouting, match="either languages or a detector"):
        LanguageRoutes(ROUTES, languages=("en", "pt"), detector=CountingDetector())


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(InvalidRouting, match="max_chars"):
        LanguageDetector(("en", "pt"), max_chars=0)


def test_a_routed_language_outside_the_detector_languages_is_refused() -> None:
    with pytest.raises(InvalidRouting, match="add it to the languages setting") as caught:
        LanguageRoutes({"sentiment": {"es": "sentiment-es"}}, languages=("en", "pt"))
    assert caught.value.field == "routes['sentiment']['es']"
