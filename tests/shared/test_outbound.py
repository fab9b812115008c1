"""Outbound safety: URL and address checks, and requests that connect only to vetted addresses."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from shared.outbound import OutboundPolicy, OutboundRefused, parse_allow_cidrs
from shared.outbound_http import OutboundError, Timeouts, post, request


def fixed(*addresses: str) -> OutboundPolicy:
    """A policy whose resolver answers ``addresses`` for every host."""
    return OutboundPolicy(resolver=lambda host, port: list(addresses))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.8",
        "172.16.4.4",
        "192.168.1.1",
        "169.254.10.10",
        "169.254.169.254",
        "100.64.0.1",
        "100.100.100.200",
        "0.0.0.0",
        "224.0.0.251",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "2002:7f00:1::1",
    ],
)
def test_hosts_resolving_to_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(OutboundRefused, match=r"outbound requests may only reach public addresses"):
        fixed(address).check_url("https://hooks.example.com/x")


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    fixed(address).check_url("https://hooks.example.com/x")


def test_every_resolved_address_must_be_public() -> None:
    with pytest.raises(OutboundRefused, match=r"10\.0\.0\.1"):
        fixed("93.184.215.14", "10.0.0.1").check_url("https://hooks.example.com/x")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest",
    ],
)
def test_ip_literals_and_localhost_are_checked_without_a_custom_resolver(url: str) -> None:
    with pytest.raises(OutboundRefused):
        OutboundPolicy().check_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "scheme must be http or https"),
        ("file:///etc/passwd", "scheme must be http or https"),
        ("javascript:alert(1)", "scheme must be http or https"),
        ("https:///path", "no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com/a b", "whitespace"),
        ("https://example.com:99999/", "malformed"),
        ("https://example.com/" + "a" * 2100, "longer than"),
    ],
)
def test_malformed_or_non_http_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(OutboundRefused, match=message):
        fixed("93.184.215.14").check_url(url)


def test_a_host_that_does_not_resolve_is_refused() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(OutboundRefused, match="does not resolve"):
        OutboundPolicy(resolver=fail).check_url("https://nowhere.invalid/")


def test_allowed_cidrs_open_private_ranges_but_never_metadata() -> None:
    policy = OutboundPolicy(parse_allow_cidrs("127.0.0.0/8, 10.0.0.0/8,::1/128"))
    policy.check_url("http://127.0.0.1:9/x")
    policy.check_url("http://[::1]:9/x")
    policy.check_url("http://[::ffff:10.1.2.3]:9/x")  # the mapped form of an allowed address
    with pytest.raises(OutboundRefused):
        policy.check_url("http://192.168.0.1/x")
    wide = OutboundPolicy(parse_allow_cidrs("0.0.0.0/0"))
    with pytest.raises(OutboundRefused, match="metadata"):
        wide.check_url("http://169.254.169.254/latest/meta-data")


def test_bad_allow_cidrs_name_the_entry() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_allow_cidrs("127.0.0.0/8,10.0.0.0/33")


def test_refusal_is_a_value_error_with_a_readable_message() -> None:
    with pytest.raises(ValueError) as caught:
        fixed("10.0.0.1").check_url("https://hooks.example.com/x")
    assert str(caught.value) == (
        "hooks.example.com resolves to 10.0.0.1, a private address; "
        "outbound requests may only reach public addresses"
    )


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()
            return
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up at its deadline
                for _ in range(100):  # a byte at a time: only the total deadline stops this
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"host=" + self.headers["Host"].encode() + b" body=" + body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOOPBACK = parse_allow_cidrs("127.0.0.0/8")
FAST = Timeouts(connect_s=2, total_s=1)


def test_a_request_connects_to_the_vetted_address_with_the_original_host_header(server: str) -> None:
    port = server.split(":")[1]
    policy = OutboundPolicy(LOOPBACK, resolver=lambda host, p: ["127.0.0.1"])
    response = post(policy, f"http://hooks.example.test:{port}/ok", b"hi", {}, FAST)
    assert response.status == 200
    assert response.body == f"host=hooks.example.test:{port} body=hi".encode()


def test_a_request_refuses_loopback_unless_allowed(server: str) -> None:
    with pytest.raises(OutboundRefused):
        post(OutboundPolicy(), f"http://{server}/ok", b"", {}, FAST)
    assert post(OutboundPolicy(LOOPBACK), f"http://{server}/ok", b"", {}, FAST).status == 200


def test_dns_rebinding_after_the_submit_check_is_refused_at_connect_time(server: str) -> None:
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    policy = OutboundPolicy(resolver=lambda host, port: next(answers))
    url = f"http://rebind.example.test:{server.split(':')[1]}/ok"
    policy.check_url(url)  # at submit: public
    with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1"):
        post(policy, url, b"", {}, FAST)  # at delivery: re-resolved, loopback, refused before connecting


def test_redirects_are_not_followed(server: str) -> None:
    response = post(OutboundPolicy(LOOPBACK), f"http://{server}/redirect", b"", {}, FAST)
    assert (response.status, response.headers["location"]) == (302, "http://169.254.169.254/")


def test_the_total_timeout_bounds_a_trickling_response(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(OutboundError, match="timed out after 1s"):
        request(OutboundPolicy(LOOPBACK), "POST", f"http://{server}/slow", b"", {}, FAST, 1000)
    assert time.monotonic() - started < 2.5


def test_connection_failures_are_outbound_errors() -> None:
    from tests.support import free_port

    with pytest.raises(OutboundError, match="could not connect"):
        post(OutboundPolicy(LOOPBACK), f"http://127.0.0.1:{free_port()}/", b"", {}, FAST)


def test_https_verifies_the_peer(server: str) -> None:
    with pytest.raises(OutboundError, match="SSL"):
        post(OutboundPolicy(LOOPBACK), f"https://{server}/ok", b"", {}, FAST)
