"""HTTP requests to vetted addresses only (the connect-time half of :mod:`shared.outbound`).

Each request resolves the host, checks every address, and connects a socket to one of exactly those
addresses (never re-resolving), then speaks HTTP over it with the original ``Host`` header; for
https the TLS handshake sends the host name as SNI and verifies the certificate against it. So DNS
rebinding between the check and the connection cannot reach a refused address. Redirects are never
followed (a 3xx is just a response), and no proxy environment variables apply.

Timeouts: ``connect_timeout`` per connection attempt, and ``total_timeout`` for the whole request:
a watchdog shuts the socket down at the deadline, so a peer that trickles bytes cannot hold a
delivery thread longer than that. Only the first ``max_response_bytes`` of a body are read.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field

from shared.outbound import OutboundPolicy, OutboundTarget

USER_AGENT = "Fluxgate-Webhooks/0.1"


class OutboundError(Exception):
    """The request did not produce a response (connection, TLS, protocol or timeout failure)."""


@dataclass(frozen=True)
class OutboundResponse:
    """What came back: the status, headers with lower-case names, and the start of the body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    total_s: float = 10.0


def _connect(
    target: OutboundTarget, policy: OutboundPolicy, timeouts: Timeouts, deadline: float
) -> socket.socket:
    """A TCP connection to the first vetted address that answers."""
    errors: list[str] = []
    for address in target.addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            sock = socket.create_connection(
                (str(address), target.port), timeout=min(timeouts.connect_s, remaining)
            )
        except OSError as error:
            errors.append(f"{address}: {error}")
            continue
        try:  # belt and braces: the peer is the address we vetted
            policy.check_address(target.host, sock.getpeername()[0])
        except Exception:
            sock.close()
            raise
        return sock
    detail = "; ".join(errors) or "out of time"
    raise OutboundError(f"could not connect to {target.host}:{target.port} ({detail})")


def _open(target: OutboundTarget, sock: socket.socket) -> http.client.HTTPConnection:
    """An HTTP(S) connection object speaking over ``sock`` (already connected, TLS-wrapped for https)."""
    if target.scheme == "https":
        context = ssl.create_default_context()
        sock = context.wrap_socket(sock, server_hostname=target.host)  # SNI and hostname verification
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port, context=context
        )
    else:
        connection = http.client.HTTPConnection(target.host, target.port)
    connection.sock = sock  # http.client then never connects (or resolves) on its own
    return connection


class _Watchdog:
    """Shuts a socket down at a deadline, waking a request thread blocked in recv or send.

    It holds its own duplicate of the socket's descriptor (which survives the TLS wrap detaching the
    original object) and shuts it down at the OS level, which ends every descriptor of the socket.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock.dup()
        self._lock = threading.Lock()
        self.fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock, suppress(OSError):
            self.fired = True
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:  # never shut down a descriptor number that was closed and reused
            self._sock.close()


def post(
    policy: OutboundPolicy,
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeouts: Timeouts,
    max_response_bytes: int = 4096,
) -> OutboundResponse:
    """POST ``body`` to ``url`` under ``policy``; raises OutboundRefused or OutboundError."""
    return request(policy, "POST", url, body, headers, timeouts, max_response_bytes)


def request(
    policy: OutboundPolicy,
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    timeouts: Timeouts,
    max_response_bytes: int = 4096,
) -> OutboundResponse:
    """One request to a vetted address, no redirects followed; raises OutboundRefused or OutboundError."""
    deadline = time.monotonic() + timeouts.total_s
    target = policy.vet(url)  # resolve and check now, immediately before connecting
    sock = _connect(target, policy, timeouts, deadline)
    watchdog = _Watchdog(sock, deadline - time.monotonic())
    connection: http.client.HTTPConnection | None = None
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        connection = _open(target, sock)
        connection.request(method, target.path, body=body, headers={"User-Agent": USER_AGENT, **headers})
        response = connection.getresponse()
        data = response.read(max_response_bytes)
        if watchdog.fired:  # a read cut short by the deadline ends quietly, as if the body were complete
            raise TimeoutError("the deadline passed")
        return OutboundResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as error:
        late = time.monotonic() >= deadline
        reason = f"timed out after {timeouts.total_s:g}s" if late else f"{type(error).__name__}: {error}"
        raise OutboundError(f"{method} {target.host}: {reason}") from error
    finally:
        watchdog.close()
        with suppress(Exception):
            (connection or sock).close()
