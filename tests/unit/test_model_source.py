"""Model sources a worker is told to serve (settings, the repository extension)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopline.errors import InvalidInput
from services.inference.models import ModelSource


def test_registry_uris_and_folders(tmp_path: Path) -> None:
    assert ModelSource.parse("models:/sentiment@champion").alias == "champion"
    assert ModelSource.parse("models:/sentiment/3").version == "3"
    assert ModelSource.parse(str(tmp_path)).path == tmp_path.resolve()


@pytest.mark.parametrize(
    "text",
    [
        "models:/../3",
        "models:/.@champion",
        "models:/a/b/3",
        "models:/x/latest",
        "nowhere",
        "x" * 500,  # longer than a file name may be
        "~no-such-user-here/package",
    ],
)
def test_what_is_neither_is_refused_naming_it(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        ModelSource.parse(text)
    assert text in caught.value.message
