"""Assertions the tests share about answers."""

from __future__ import annotations

import math

import requests


def assert_json_error(response: requests.Response, status: int, mentions: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert mentions in error["message"], error
    assert "Traceback" not in response.text



QUESTION = "What is the capital of France?"


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
