"""Outbound HTTP to URLs that requests name: connections go only to addresses checked as public (SPEC 8).

The servers here are real (loopback HTTP servers in threads); the DNS answers are not: `names` replaces the
resolver for made-up host names, so that a name can answer a public address to one lookup and the loopback
server's address to the next, as a rebinding DNS server does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from diffusers_api import outbound
from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs, StorageError
from diffusers_api.events import EventHub, WebhookSender
from diffusers_api.models.transfer import http_download, s3_client
from diffusers_api.outbound import check_public_url, http_client
from diffusers_api.schema import GenerateRequest
from support.receiver import receiver
from support.servers import file_server

# Stands in for an attacker's public server: the tests treat it as public, and nothing listens on it, so a
# connection to it is refused at once and nothing ever leaves the machine.
PUBLIC = "127.0.0.2"
Answers = dict[str, Callable[[], str]]


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> Answers:
    """host name -> a function giving the address of each lookup; other names resolve as usual."""
    answers: Answers = {}
    real_resolve, real_is_public = socket.getaddrinfo, outbound.is_public

    def resolve(host: object, port: object, *args: object, **kwargs: object) -> list[tuple]:
        if isinstance(host, str) and host in answers:
            address = answers[host]()
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]
        return real_resolve(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(outbound, "is_public", lambda ip: str(ip) == PUBLIC or real_is_public(ip))
    return answers


def rebinding(public_answers: int) -> Callable[[], str]:
    """A rebinding DNS server: the public address to the first `public_answers` lookups, loopback after."""
    lookups = itertools.count()
    return lambda: PUBLIC if next(lookups) < public_answers else "127.0.0.1"


@pytest.mark.parametrize("public_answers", [1, 2, 3])
def test_a_name_that_rebinds_to_loopback_never_gets_a_download(
    names: Answers, tmp_path: Path, public_answers: int
) -> None:
    """However many lookups see the public address first, the loopback server never gets a request."""
    with file_server() as files:
        files.files["/model.tar.zst"] = b"weights"
        port = files.url.rsplit(":", 1)[1]
        names["rebind.test"] = rebinding(public_answers)
        dest = tmp_path / "download"
        with pytest.raises(InvalidInputs, match=r"rebind\.test.* non-public address 127\.0\.0\.1") as caught:
            http_download(f"http://rebind.test:{port}/model.tar.zst", dest, Settings(download_timeout_s=5))
        assert files.requests == []
    assert caught.value.status == 422
    assert not dest.exists() or dest.read_bytes() == b""


def test_the_guarded_client_checks_every_connection_not_only_the_first_name(names: Answers) -> None:
    """No check before the call: the connection itself is refused."""
    with file_server() as files:
        files.files["/x"] = b"x"
        port = files.url.rsplit(":", 1)[1]
        names["inside.test"] = lambda: "127.0.0.1"
        with http_client(True, "download URL") as guarded, pytest.raises(InvalidInputs, match="ALLOW_PRIVATE_URLS"):
            guarded.get(f"http://inside.test:{port}/x")
        with http_client(False, "download URL") as plain:
            assert plain.get(f"http://inside.test:{port}/x").content == b"x"
        assert files.requests == [("/x", None)]


def test_with_the_opt_in_a_private_archive_downloads(names: Answers, tmp_path: Path) -> None:
    with file_server() as files:
        files.files["/model.tar.zst"] = b"weights"
        port = files.url.rsplit(":", 1)[1]
        names["rebind.test"] = rebinding(1)
        dest = tmp_path / "download"
        http_download(f"http://rebind.test:{port}/model.tar.zst", dest, Settings(allow_private_urls=True))
    assert dest.read_bytes() == b"weights"


def test_a_name_that_does_not_resolve_at_connection_time_is_a_retryable_connection_error(names: Answers) -> None:
    def gone() -> str:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    names["gone.test"] = gone
    with http_client(True, "download URL") as guarded, pytest.raises(httpx.ConnectError, match="cannot resolve"):
        guarded.get("http://gone.test/x")


def test_a_request_send_url_that_rebinds_to_loopback_gets_no_webhook(names: Answers) -> None:
    sender = WebhookSender(timeout_s=2, retries=0)
    with receiver() as hook:
        port = hook.url.split(":")[2].split("/")[0]
        names["hook.test"] = rebinding(1)
        hub = EventHub(Settings(), sender=sender)
        events = asyncio.run(hub.for_request(GenerateRequest(send_url=f"http://hook.test:{port}/hook")))
        events.emit("inference", "start")
        assert sender.flush(10)
        assert hook.posts == []
    assert sender.delivered == 0


def test_the_operators_send_url_may_be_private(names: Answers) -> None:
    sender = WebhookSender(timeout_s=2, retries=0)
    with receiver() as hook:
        names["internal.test"] = lambda: "127.0.0.1"
        settings = Settings(send_url=hook.url.replace("127.0.0.1", "internal.test"))
        EventHub(settings, sender=sender).for_boot().emit("init", "start")
        assert sender.flush(10)
        assert [post.json()["type"] for post in hook.posts] == ["init"]


def test_webhooks_do_not_follow_redirects() -> None:
    sender = WebhookSender(timeout_s=2, retries=0)
    with receiver(redirect_to="/elsewhere") as hook:
        sender.send(hook.url, {"type": "inference", "status": "done"}, None)
        assert sender.flush(10)
        assert [(post.method, post.path) for post in hook.posts] == [("POST", "/hook")]
    assert sender.delivered == 0


def test_an_s3_endpoint_named_by_a_model_url_must_be_public(names: Answers) -> None:
    names["minio.test"] = lambda: "10.0.0.5"
    with pytest.raises(InvalidInputs, match=r"S3 endpoint .*non-public address 10\.0\.0\.5"):
        s3_client("http://minio.test:9000", Settings())
    assert s3_client("http://minio.test:9000", Settings(allow_private_urls=True)) is not None
    # the operator's own endpoint is trusted
    assert s3_client("http://minio.test:9000", Settings(aws_s3_endpoint_url="http://minio.test:9000")) is not None


def test_check_public_url_names_what_is_wrong(names: Answers) -> None:
    names["inside.test"] = lambda: "169.254.169.254"
    with pytest.raises(InvalidInputs, match=r"SEND_URL 'http://inside\.test/' resolves to .*169\.254\.169\.254"):
        check_public_url("http://inside.test/", False, "SEND_URL")
    with pytest.raises(InvalidInputs, match="has no host"):
        check_public_url("http:///path", False, "SEND_URL")
    with pytest.raises(StorageError, match="cannot resolve"):
        check_public_url("http://no-such-host.invalid/", False, "SEND_URL")
    check_public_url("http://inside.test/", True, "SEND_URL")  # the opt-in


# Addresses a URL named by a request must never reach, with why (the refusal list, kept as a table).
REFUSED = {
    "127.0.0.1": "loopback",
    "10.1.2.3": "private (RFC 1918)",
    "172.16.0.1": "private (RFC 1918)",
    "192.168.1.1": "private (RFC 1918)",
    "169.254.169.254": "link-local: AWS, GCP and Azure metadata",
    "100.64.0.1": "carrier-grade NAT (RFC 6598)",
    "100.100.100.200": "carrier-grade NAT: Alibaba Cloud metadata",
    "0.0.0.0": "unspecified",
    "192.0.0.1": "IETF protocol assignments",
    "192.0.2.1": "documentation (TEST-NET-1)",
    "198.18.0.1": "benchmarking",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast (SSDP)",
    "240.0.0.1": "reserved",
    "255.255.255.255": "broadcast",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fc00::1": "unique local",
    "fd00:ec2::254": "unique local: AWS metadata over IPv6",
    "ff02::1": "multicast",
    "2001:db8::1": "documentation",
    "::ffff:127.0.0.1": "IPv4-mapped loopback",
    "::ffff:169.254.169.254": "IPv4-mapped metadata",
    "64:ff9b::a9fe:a9fe": "NAT64 of the metadata address",
    "2002:a9fe:a9fe::1": "6to4 of the metadata address",
    "2002:a00:1::1": "6to4 of a private address",
}
PUBLIC_ADDRESSES = ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2606:4700:4700::1111", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", list(REFUSED), ids=[f"{a} {why}" for a, why in REFUSED.items()])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not outbound.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_pass(address: str) -> None:
    assert outbound.is_public(ipaddress.ip_address(address))


def test_a_name_in_carrier_grade_nat_is_refused(names: Answers) -> None:
    names["metadata.test"] = lambda: "100.100.100.200"
    with pytest.raises(InvalidInputs, match=r"non-public address 100\.100\.100\.200"):
        check_public_url("http://metadata.test/latest/meta-data", False, "image")
