"""The int8 accuracy gate's allowance: the configured limit, never finer than one validation
text (a 0.5-point limit cannot be judged on 60 texts, where one label is 1.7 points)."""

from __future__ import annotations

import pytest

from loopline.package import Parity
from services.trainer import export as exportlib
from services.trainer.pipeline import _int8_drop_allowed


@pytest.mark.parametrize(
    ("texts", "limit", "allowed"),
    [
        (1000, 0.5, 0.5),  # the real validation set: the limit stands
        (60, 0.5, 100 / 60),  # one text's worth
        (60, 5.0, 5.0),  # a looser limit stands
        (60, -1.0, -1.0),  # int8 must beat fp32: kept as given
        (0, 0.5, 0.5),  # count unknown
    ],
)
def test_the_allowance_is_never_finer_than_one_text(
    texts: int, limit: float, allowed: float
) -> None:
    parity = Parity(fp32_max_abs_logit_diff=0.0, fp32_label_agreement=1.0, texts=texts)
    options = exportlib.ExportOptions(max_int8_accuracy_drop_points=limit)
    assert _int8_drop_allowed(parity, options) == pytest.approx(allowed)
