"""Fetching product images by URL: opt-in, http(s) only, public addresses only, bounded size and time."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit


class FetchError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _connect_public(host: str, port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to one of host's public addresses, never to a private, loopback or
    link-local one. Resolving here and connecting to the checked address itself leaves no window
    for DNS rebinding, and nothing internal is ever contacted (not even a SYN)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError("unreachable", f"cannot resolve {host}: {exc.strerror}") from None
    public = [info for info in infos if _is_public(info[4][0])]
    if not public:
        found = ", ".join(sorted({info[4][0] for info in infos}))
        raise FetchError("forbidden_address", f"{host} resolves to no public address ({found})")
    error: OSError | None = None
    for family, kind, proto, _, address in public:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class _PublicHTTPConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = _connect_public(self.host, self.port, self.timeout)


class _PublicHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        self.sock = _connect_public(self.host, self.port, self.timeout)
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


# No proxies from the environment: through a proxy, the peer checked above would be the proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _HTTPHandler, _HTTPSHandler, _RedirectHandler)
_CHUNK = 64 * 1024


def _read_bounded(resp, url: str, *, max_bytes: int, deadline: float) -> bytes:
    """At most max_bytes + 1 bytes, and no later than the deadline: the socket timeout alone bounds
    each read, so a server trickling a byte at a time could otherwise hold a fetch for hours."""
    parts: list[bytes] = []
    size = 0
    while size <= max_bytes:
        if time.monotonic() > deadline:
            raise FetchError("timeout", f"{url}: not fully received within the time limit")
        chunk = resp.read1(min(_CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


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
    deadline = time.monotonic() + timeout_s
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError("too_large", f"{url} is {declared} bytes; the limit is {max_bytes}")
            data = _read_bounded(resp, url, max_bytes=max_bytes, deadline=deadline)
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
