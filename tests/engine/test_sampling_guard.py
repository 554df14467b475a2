"""The generation service's own guard on sampling values, behind the wire formats' validation."""

from __future__ import annotations

import pytest

from api.errors import InvalidRequest
from api.generation import check_sampling
from api.sampling import SamplingParams


@pytest.mark.parametrize(("values", "param"), [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"repeat_last_n": -1}, "repeat_last_n"),
])
def test_out_of_range_values_are_refused(values: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_sampling(SamplingParams(**{"max_tokens": 8, **values}))
    assert caught.value.param == param and caught.value.status == 400


def test_values_in_range_pass() -> None:
    sampling = SamplingParams(max_tokens=8, temperature=0, top_p=1, top_k=0, min_p=0, repeat_penalty=1, repeat_last_n=0)
    assert check_sampling(sampling) is sampling
