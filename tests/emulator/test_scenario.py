"""Scenario knobs: defaults from DESIGN.md and one-line errors naming file, line and knob."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.emulator import RateLimitSpec, Scenario, load_scenario
from pipeline.errors import ConfigError


def test_defaults_match_design() -> None:
    s = Scenario()
    assert (s.task_seconds, s.sync_seconds) == (0.2, 0.05)
    assert (
        s.transient_error_rate,
        s.permanent_error_rate,
        s.task_failure_rate,
        s.disconnect_rate,
    ) == (0, 0, 0, 0)
    assert s.rate_limit is None
    assert s.result_url_ttl_seconds == 7200
    assert s.ailab_result_url_ttl_seconds == 86400
    assert s.seed == 1
    assert s.ailab_api_keys is None and s.perfectcorp_api_keys is None
    assert s.legacy_service_choice == "accept"
    assert s.beauty_result_field == "result_url"
    assert s.ailab_task_failure_style == "status3"


def test_frozen_and_strict() -> None:
    with pytest.raises(ValidationError):
        Scenario(tyop=1)  # type: ignore[call-arg]
    s = Scenario()
    with pytest.raises(ValidationError):
        s.seed = 2


def test_rate_limit_needs_a_whole_budget() -> None:
    assert RateLimitSpec(requests=250, per_seconds=300, qps=5).qps == 5
    assert RateLimitSpec(qps=5).requests is None
    with pytest.raises(ValidationError):
        RateLimitSpec(requests=250)
    with pytest.raises(ValidationError):
        RateLimitSpec()


def test_fatal_vendor_follows_the_code() -> None:
    assert Scenario(fatal_error="ERROR_USER_LOCKED").fatal_vendor() == "ailab"
    assert Scenario(fatal_error="InactiveApiKey").fatal_vendor() == "perfectcorp"
    assert Scenario().fatal_vendor() is None


def test_load_none_and_empty_give_defaults(tmp_path: Path) -> None:
    assert load_scenario(None) == Scenario()
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_scenario(empty) == Scenario()


def test_load_full_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "task_seconds: 1.5\n"
        "rate_limit: {requests: 250, per_seconds: 300, qps: 5}\n"
        "ailab_api_keys: [a, b]\n"
        "ailab_credits: {common: 10, portrait_ai_face_swap: 5}\n"
        "fatal_error: ERROR_AI_NOT_EXISTS\n"
    )
    s = load_scenario(path)
    assert s.task_seconds == 1.5
    assert s.rate_limit == RateLimitSpec(requests=250, per_seconds=300, qps=5)
    assert s.ailab_api_keys == ("a", "b")
    assert s.ailab_credits == {"common": 10.0, "portrait_ai_face_swap": 5.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("task_seconds: 1\ntyop: 2\n", ":2: tyop: unknown knob"),
        (
            "seed: 1\n\ntransient_error_rate: 1.5\n",
            ":3: transient_error_rate: Input should be less than or equal to 1",
        ),
        ("rate_limit:\n  requests: 5\n  qpz: 1\n", ":3: rate_limit.qpz: unknown field"),
        ("task_seconds: [1\n", "invalid YAML"),
        ("- 1\n- 2\n", ":1: a scenario must be a mapping"),
        ("fatal_error: NOPE\n", ":1: fatal_error: Input should be"),
    ],
)
def test_load_errors_name_file_line_and_knob(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scenario file not found"):
        load_scenario(tmp_path / "nope.yaml")
