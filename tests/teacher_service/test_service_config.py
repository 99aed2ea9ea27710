"""Validation of the teacher application's settings and token file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from teacher_service.service_config import ServiceConfig, read_token_digest


def test_defaults_follow_batch_size() -> None:
    config = ServiceConfig(teacher="t.safetensors", max_batch_images=64)
    assert config.images_per_request_limit == 64
    assert config.images_in_flight_limit == 256
    assert config.ongoing_requests_limit == 128


def test_request_must_fit_in_a_batch() -> None:
    with pytest.raises(ValueError, match="must be in 1..max_batch_images \\(8\\)"):
        ServiceConfig(teacher="t", max_batch_images=8, max_images_per_request=9)


def test_in_flight_must_fit_a_request() -> None:
    with pytest.raises(ValueError, match="no full-size request"):
        ServiceConfig(teacher="t", max_batch_images=8, max_images_in_flight=4)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("amp", "fp8", "amp must be one of"),
        ("max_batch_images", 0, "max_batch_images must be at least 1"),
        ("batch_wait_ms", -1.0, "must not be negative"),
        ("torch_threads", 0, "torch_threads must be at least 1"),
    ],
)
def test_invalid_values_are_rejected(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ServiceConfig(teacher="t", **{field: value})  # type: ignore[arg-type]


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown teacher service settings \\['max_batch'\\]"):
        ServiceConfig.from_dict({"teacher": "t", "max_batch": 4})


def test_token_digest_reads_first_line(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret  \nignored\n")
    assert read_token_digest(str(token_file)) == hashlib.sha256(b"s3cret").digest()
    assert read_token_digest(None) is None


def test_token_file_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_digest(str(empty))
    with pytest.raises(ValueError, match="cannot read token file"):
        read_token_digest(str(tmp_path / "missing"))


def test_run_limit_default_and_range() -> None:
    config = ServiceConfig(teacher="t", max_batch_images=16)
    assert config.run_images_in_flight_limit == 32
    small = ServiceConfig(teacher="t", max_batch_images=8, max_images_in_flight=12)
    assert small.run_images_in_flight_limit == 12
    with pytest.raises(ValueError, match="max_run_images_in_flight 4 must be in .*\\(8..32\\)"):
        ServiceConfig(teacher="t", max_batch_images=8, max_run_images_in_flight=4)
    with pytest.raises(ValueError, match="max_run_images_in_flight -1 must be in"):
        ServiceConfig(teacher="t", max_run_images_in_flight=-1)


def test_autoscaling_config_from_fields() -> None:
    fixed = ServiceConfig(teacher="t", num_replicas=3)
    assert fixed.autoscaling_config() is None
    assert fixed.replicas_description == "3 replica(s)"
    assert ServiceConfig(teacher="t").replicas_description == "1 replica(s)"
    scaled = ServiceConfig(teacher="t", max_replicas=4, target_ongoing_requests=2)
    assert scaled.autoscaling_config() == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 2,
    }
    assert scaled.replicas_description == "1 to 4 replicas"
    to_zero = ServiceConfig(teacher="t", min_replicas=0, max_replicas=2)
    assert to_zero.autoscaling_config() == {"min_replicas": 0, "max_replicas": 2}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"num_replicas": 0}, "num_replicas must be at least 1, got 0"),
        ({"num_replicas": 2, "max_replicas": 3}, "cannot be combined with min_replicas"),
        ({"min_replicas": 1}, "autoscaling needs max_replicas"),
        ({"target_ongoing_requests": 2.0}, "autoscaling needs max_replicas"),
        ({"min_replicas": -1, "max_replicas": 2}, "min_replicas must be at least 0"),
        ({"max_replicas": 0}, "max_replicas at least 1, got 1 and 0"),
        ({"min_replicas": 5, "max_replicas": 2}, "min_replicas 5 is greater than max_replicas 2"),
        ({"max_replicas": 2, "target_ongoing_requests": 0.0}, "must be positive and at most"),
        (
            {"max_replicas": 2, "target_ongoing_requests": 600.0},
            "at most max_ongoing_requests \\(512\\)",
        ),
    ],
)
def test_replica_settings_are_checked(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ServiceConfig(teacher="t", **fields)  # type: ignore[arg-type]
