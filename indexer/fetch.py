"""Fetching product images by URL: opt-in, http(s) only, public addresses only, bounded size and time."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit


class FetchError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _check_peer(sock: socket.socket, host: str) -> None:
    addr = ipaddress.ip_address(sock.getpeername()[0])
    if not addr.is_global or addr.is_multicast:
        sock.close()
        raise FetchError("forbidden_address", f"{host} resolves to a non-public address ({addr})")


class _PublicHTTPConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        # Checked after connecting, on the address actually used: immune to DNS rebinding.
        _check_peer(self.sock, self.host)


class _PublicHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        # HTTPSConnection.connect = TCP connect (checked here) + TLS wrap.
        http.client.HTTPConnection.connect(self)
        _check_peer(self.sock, self.host)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PublicHTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_PublicHTTPSConnection, req)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = 3

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise FetchError("forbidden_scheme", f"redirect to a non-http(s) URL: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler, _RedirectHandler)


def fetch_image_url(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        if host:
            host.encode("idna")  # a host that cannot be encoded fails here, not deep in http.client
    except (ValueError, UnicodeError) as exc:
        raise FetchError("bad_url", f"not a usable URL: {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise FetchError("forbidden_scheme", f"only http(s) URLs with a host are fetched: {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "prism-indexer/0.1", "Accept": "image/*"})
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError("too_large", f"{url} is {declared} bytes; the limit is {max_bytes}")
            data = resp.read(max_bytes + 1)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        raise FetchError("http_error", f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, UnicodeError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, FetchError):
            raise reason from None
        raise FetchError("unreachable", f"{url}: {reason}") from None
    if len(data) > max_bytes:
        raise FetchError("too_large", f"{url} is larger than the limit of {max_bytes} bytes")
    return data
