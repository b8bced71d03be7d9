"""Opening connections: TLS contexts, timeouts, and translating network failures.

Every connector opens its sockets here so that certificate verification is on by default
everywhere and every low-level failure becomes the same typed error with the same advice:
connection refused, host not found, timeout, certificate not trusted, host name mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from serversync.core.errors import PermanentError, SyncError, TransientError
from serversync.core.model import Endpoint, TlsMode


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Per-profile connection settings every connector needs."""

    timeout: float = 30.0
    ca_file: str | None = None  # extra trust anchor, added to the system store
    shared_namespace: str = "shared/{user}/"


_CONTEXTS: dict[tuple[str | None, int, int], ssl.SSLContext] = {}


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify certificates and host names always; add ``ca_file`` to the system trust store.

    Contexts are shared per CA file (and its mtime and size, so a replaced file is read
    again): loading the system store costs ~25 ms of CPU, which dominated every new
    connection. A context is never changed after it is built, so sharing it is safe.
    """
    try:
        stat = os.stat(ca_file) if ca_file else None
    except OSError:
        stat = None  # unreadable: _build_context raises the typed error
    key = (ca_file, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    context = _CONTEXTS.get(key)
    if context is None or (ca_file and stat is None):
        context = _build_context(ca_file)
        if len(_CONTEXTS) > 64:  # many CA files over time: start again
            _CONTEXTS.clear()
        _CONTEXTS[key] = context
    return context


def _build_context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentError(f"cannot read the CA file {ca_file}: {exc}",
                                 fix="point ca_file at a readable PEM certificate",
                                 code="tls-ca-file") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _where(endpoint: Endpoint) -> str:
    return f"{endpoint.host}:{endpoint.port}"


def translate(exc: BaseException, endpoint: Endpoint, what: str) -> SyncError:
    """Map a socket, TLS or timeout failure to a typed error that says what to fix."""
    where = _where(endpoint)
    if isinstance(exc, SyncError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        # 62: X509_V_ERR_HOSTNAME_MISMATCH, 64: X509_V_ERR_IP_ADDRESS_MISMATCH
        if exc.verify_code in (62, 64) or "mismatch" in str(exc.verify_message).lower():
            return PermanentError(
                f"{what} at {where}: the server's TLS certificate does not match the host "
                f"name {endpoint.host!r} ({exc.verify_message})",
                fix="connect with the host name the certificate was issued for, or reissue "
                    "the certificate with this name", code="tls-hostname")
        return PermanentError(
            f"{what} at {where}: the server's TLS certificate is not trusted "
            f"({exc.verify_message})",
            fix="install a certificate from a trusted CA on the server, or set ca_file on the "
                "profile to the CA that issued it", code="tls-untrusted")
    if isinstance(exc, ssl.SSLError):
        return PermanentError(f"{what} at {where}: TLS handshake failed ({exc.reason})",
                              fix="check the port and TLS mode (implicit TLS vs STARTTLS)",
                              code="tls-failed")
    if isinstance(exc, ConnectionRefusedError):
        return TransientError(f"{what} at {where}: connection refused",
                              fix="check the host and port, and that the server is running",
                              code="connection-refused")
    if isinstance(exc, socket.gaierror):
        return TransientError(f"{what}: host {endpoint.host!r} not found ({exc.strerror})",
                              fix="check the host name in the profile", code="host-not-found")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return TransientError(f"{what} at {where}: no answer in time",
                              fix="check the network path and the profile's connection timeout",
                              code="timeout")
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionError | EOFError):
        return TransientError(f"{what} at {where}: the server closed the connection",
                              fix="retry later; if it persists, check the server's logs",
                              code="connection-lost")
    if isinstance(exc, OSError):
        return TransientError(f"{what} at {where}: {exc.strerror or exc}",
                              fix="check the network path to the server", code="network")
    return TransientError(f"{what} at {where}: {type(exc).__name__}: {exc}", code="network")


@contextlib.contextmanager
def translated(endpoint: Endpoint, what: str) -> Iterator[None]:
    """Re-raise any failure inside the block as a typed `SyncError`."""
    try:
        yield
    except SyncError:
        raise
    except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError) as exc:
        raise translate(exc, endpoint, what) from exc


async def open_stream(endpoint: Endpoint, options: ConnectOptions, what: str,
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection, wrapped in TLS at once for `TlsMode.IMPLICIT`."""
    context = tls_context(options.ca_file) if endpoint.tls is TlsMode.IMPLICIT else None
    with translated(endpoint, what):
        return await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, ssl=context,
                                    server_hostname=endpoint.host if context else None,
                                    limit=2**20),
            options.timeout)


async def start_tls(writer: asyncio.StreamWriter, endpoint: Endpoint, options: ConnectOptions,
                    what: str) -> None:
    """Upgrade a plain connection after STARTTLS/STLS was accepted."""
    with translated(endpoint, what):
        await asyncio.wait_for(
            writer.start_tls(tls_context(options.ca_file), server_hostname=endpoint.host),
            options.timeout)
