"""Normalized ids and every MODEL_URL form of SPEC 3, with the rule that tells endpoints from buckets."""

from __future__ import annotations

import pytest

from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs
from diffusers_api.models.locations import HTTPLocation, S3Location, normalized_id, parse_model_url

KEY = "models--org--name.tar.zst"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("org/name",), "models--org--name"),
        (("org/name", "main", "fp16", "fp16"), "models--org--name--main--fp16--fp16"),
        (("org/name", None, None, "bf16"), "models--org--name--bf16"),
        (("builtin/tiny-sd",), "models--builtin--tiny-sd"),
        (("../../etc/passwd",), "models--etc--passwd"),
        (("org/we ird:name",), "models--org--we-ird-name"),
    ],
    ids=["plain", "all-parts", "precision-only", "builtin", "no-traversal", "unsafe-characters"],
)
def test_normalized_id(args: tuple[str, ...], expected: str) -> None:
    assert normalized_id(*args) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://", S3Location("http://minio:9000", "default-bucket", KEY)),
        ("s3:///bucket/path/x.tar.zst", S3Location("http://minio:9000", "bucket", "path/x.tar.zst")),
        ("s3:///bucket/", S3Location("http://minio:9000", "bucket", KEY)),
        ("s3:///my.dotted.bucket/k", S3Location("http://minio:9000", "my.dotted.bucket", "k")),
        ("s3://bucket/key.tar.zst", S3Location("http://minio:9000", "bucket", "key.tar.zst")),
        ("s3://bucket/prefix/", S3Location("http://minio:9000", "bucket", f"prefix/{KEY}")),
        ("s3://acct.r2.example.com/bucket/k", S3Location("https://acct.r2.example.com", "bucket", "k")),
        ("s3://localhost:9000/bucket/k", S3Location("https://localhost:9000", "bucket", "k")),
        ("http+s3://127.0.0.1:9000/bucket/k", S3Location("http://127.0.0.1:9000", "bucket", "k")),
        ("https+s3://store.example.com/bucket", S3Location("https://store.example.com", "bucket", KEY)),
        ("https://example.com/m.tar.zst", HTTPLocation("https://example.com/m.tar.zst")),
    ],
    ids=[
        "defaults",
        "three-slashes",
        "three-slashes-default-key",
        "dotted-bucket",
        "standard",
        "standard-prefix",
        "original-endpoint-form",
        "endpoint-with-port",
        "http-s3",
        "https-s3-default-key",
        "plain-https",
    ],
)
def test_model_url_forms(url: str, expected: S3Location | HTTPLocation) -> None:
    settings = Settings(aws_s3_endpoint_url="http://minio:9000", aws_s3_default_bucket="default-bucket")
    assert parse_model_url(url, KEY, settings) == expected


def test_standard_form_on_aws_when_no_endpoint_is_configured() -> None:
    assert parse_model_url("s3://bucket/k", KEY, Settings()) == S3Location(None, "bucket", "k")


@pytest.mark.parametrize("url", ["s3://", "s3:///"], ids=["bare", "three-slashes"])
def test_no_bucket_anywhere_is_a_clear_error(url: str) -> None:
    with pytest.raises(InvalidInputs, match="AWS_S3_DEFAULT_BUCKET"):
        parse_model_url(url, KEY, Settings())


@pytest.mark.parametrize("url", ["ftp://host/x", "http+s3:///bucket/k"], ids=["scheme", "http-s3-without-host"])
def test_bad_model_urls(url: str) -> None:
    with pytest.raises(InvalidInputs) as caught:
        parse_model_url(url, KEY, Settings(aws_s3_default_bucket="b"))
    assert caught.value.extra["field"] == "model_url"
