"""A study whose SR cannot be written is retried with a growing delay, not on every tick."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gastrolens.daemon import completion
from gastrolens.daemon.completion import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, StudyCompletion
from gastrolens.errors import OutputError


def test_a_failing_study_waits_longer_each_time_and_the_others_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(completion.time, "monotonic", lambda: clock[0])
    owner = StudyCompletion(SimpleNamespace(destinations=()), None, None, "w")  # type: ignore[arg-type]
    tried: list[int] = []

    def work(study_id: int) -> int:
        tried.append(study_id)
        if study_id == 1:
            raise OutputError("disk full")
        return 1

    assert owner._one_by_one("study", [1, 2], work) == 1
    assert owner._one_by_one("study", [1, 2], work) == 1  # on the next tick only study 2
    assert tried == [1, 2, 2]
    clock[0] += RETRY_FIRST_SECONDS
    owner._one_by_one("study", [1], work)
    assert tried[-1] == 1
    clock[0] += RETRY_FIRST_SECONDS  # the second delay is twice the first: not yet
    owner._one_by_one("study", [1], work)
    assert tried.count(1) == 2
    clock[0] += RETRY_FIRST_SECONDS
    owner._one_by_one("study", [1], work)
    assert tried.count(1) == 3
    for _ in range(20):
        clock[0] += RETRY_MAX_SECONDS
        owner._one_by_one("study", [1], work)
    assert owner._failing[("study", 1)][1] == RETRY_MAX_SECONDS


def test_a_study_that_succeeds_again_is_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(completion.time, "monotonic", lambda: clock[0])
    owner = StudyCompletion(SimpleNamespace(destinations=()), None, None, "w")  # type: ignore[arg-type]
    fail = [True]

    def work(study_id: int) -> int:
        if fail[0]:
            raise OSError("read-only file system")
        return 1

    owner._one_by_one("study", [7], work)
    fail[0] = False
    clock[0] += RETRY_FIRST_SECONDS
    assert owner._one_by_one("study", [7], work) == 1
    assert owner._failing == {}
