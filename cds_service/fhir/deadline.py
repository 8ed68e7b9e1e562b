"""A wall-clock deadline for every socket operation of a FHIR read: connect, TLS handshake, send and receive."""

# requests applies its timeout to each socket operation: a server that sends one byte every 0.3 s never trips a 3 s
# read timeout. Here the reading thread carries a deadline, and every connect, TLS handshake, send and receive on
# the read's sockets gets the time left as its timeout, so the read ends by itself at the deadline whatever the
# server does. (The caller also stops waiting at the deadline: see FhirReader.read.)

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

import requests
import urllib3

_deadline = threading.local()


def set_deadline(at: float | None) -> None:
    """Give the current thread's reads until `at` (time.monotonic()); None when the thread's read is over."""
    _deadline.at = at


def _time_left() -> float | None:
    """Seconds left for the current thread's read; None outside a read. TimeoutError once it has passed."""
    at: float | None = getattr(_deadline, "at", None)
    if at is None:
        return None
    left = at - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive waits at most until the reading thread's deadline.

    The TLS socket below inherits these methods ahead of ssl.SSLSocket's, so `super()` reaches the TLS ones there
    and the plain ones here: one class for both (the arguments pass through as given, whatever their signature)."""

    def _limit(self) -> None:
        left = _time_left()
        if left is not None:
            self.settimeout(left)

    def recv(self, *args: Any) -> bytes:
        self._limit()
        return super().recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._limit()
        return super().recv_into(*args)

    def send(self, *args: Any) -> int:
        self._limit()
        return super().send(*args)

    def sendall(self, *args: Any) -> None:
        self._limit()
        super().sendall(*args)


class _DeadlineSSLSocket(_DeadlineSocket, ssl.SSLSocket):
    """The TLS socket (SSLContext.sslsocket_class): the handshake too ends by the deadline."""

    def do_handshake(self, block: bool = False) -> None:
        self._limit()
        super().do_handshake(block)


def _adopt(sock: socket.socket) -> _DeadlineSocket:
    timeout = sock.gettimeout()
    adopted = _DeadlineSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    adopted.settimeout(timeout)
    adopted._limit()  # the TLS handshake starts from this timeout
    return adopted


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _adopt(super()._new_conn())


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _adopt(super()._new_conn())

    def connect(self) -> None:
        if self.ssl_context is None:
            # What urllib3 builds by default (certificates and host names verified, CA bundle from requests), but
            # wrapping into a socket that keeps the deadline.
            context = urllib3.util.ssl_.create_urllib3_context()
            context.sslsocket_class = _DeadlineSSLSocket
            self.ssl_context = context
        super().connect()


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections keep the reading thread's deadline."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
