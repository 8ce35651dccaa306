"""Fetching product images by URL: opt-in, http(s) only, public addresses only, bounded size and time."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit


class FetchError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_INSIDE = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"))  # compatible, translated


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to its destination (mapped, NAT64, 6to4, Teredo, ...):
    on a host with NAT64, http://[64:ff9b::a9fe:a9fe]/ reaches 169.254.169.254."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64 + _IPV4_INSIDE):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and not _is_public(str(inner)):
            return False
    return ip.is_global and not ip.is_multicast


class _Deadline:
    """One fetch's whole time budget: DNS, connect, TLS, headers, redirects and body together.

    Socket timeouts bound each operation alone (a server sending its headers a byte at a time
    would never trip them), so when the budget runs out a timer shuts every socket of the fetch
    down, and whatever is blocked on one fails at once.
    """

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise FetchError("timeout", "the image URL did not answer within the time limit")
        return left

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if self.expired:
                sock.close()
                raise FetchError("timeout", "the image URL did not answer within the time limit")
            self._sockets.append(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cancel(self) -> None:
        self._timer.cancel()


def _resolve(host: str, port: int, deadline: _Deadline) -> list[tuple]:
    """getaddrinfo within the deadline (it has no timeout of its own; a stuck lookup is left to
    finish in its daemon thread)."""
    found: dict = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            found["error"] = exc

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(deadline.remaining())
    if worker.is_alive():
        raise FetchError("timeout", f"resolving {host} took longer than the time limit")
    if "error" in found:
        raise FetchError("unreachable", f"cannot resolve {host}: {getattr(found['error'], 'strerror', None) or found['error']}")
    return found["infos"]


def _connect_public(host: str, port: int, deadline: _Deadline) -> socket.socket:
    """A TCP connection to one of host's public addresses, never to a private, loopback or
    link-local one. Resolving here and connecting to the checked address itself leaves no window
    for DNS rebinding, and nothing internal is ever contacted (not even a SYN)."""
    infos = _resolve(host, port, deadline)
    public = [info for info in infos if _is_public(info[4][0])]
    if not public:
        found = ", ".join(sorted({info[4][0] for info in infos}))
        raise FetchError("forbidden_address", f"{host} resolves to no public address ({found})")
    error: OSError | None = None
    for family, kind, proto, _, address in public:
        sock = deadline.track(socket.socket(family, kind, proto))
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class _PublicHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self):
        self.sock = _connect_public(self.host, self.port, self.deadline)


class _PublicHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self):
        sock = _connect_public(self.host, self.port, self.deadline)
        self.sock = self.deadline.track(self._context.wrap_socket(sock, server_hostname=self.host))


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_PublicHTTPConnection, req, deadline=self.deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_PublicHTTPSConnection, req, context=self._context, deadline=self.deadline)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = 3

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise FetchError("forbidden_scheme", f"redirect to a non-http(s) URL: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    # No proxies from the environment: through a proxy, the address checked would be the proxy's.
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _HTTPHandler(deadline), _HTTPSHandler(deadline), _RedirectHandler
    )


_CHUNK = 64 * 1024


def _read_bounded(resp, url: str, *, max_bytes: int, deadline: float) -> bytes:
    """At most max_bytes + 1 bytes, and no later than the deadline."""
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
    deadline = _Deadline(timeout_s)
    try:
        with _opener(deadline).open(request, timeout=timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError("too_large", f"{url} is {declared} bytes; the limit is {max_bytes}")
            data = _read_bounded(resp, url, max_bytes=max_bytes, deadline=deadline.at)
    except FetchError:
        raise
    except Exception as exc:
        if deadline.expired:  # whatever the aborted socket raised, the cause is the time limit
            raise FetchError("timeout", f"{url}: no complete answer within {timeout_s:g} s") from None
        mapped = _as_fetch_error(url, exc)
        if mapped is exc:
            raise
        raise mapped from None
    finally:
        deadline.cancel()
    if len(data) > max_bytes:
        raise FetchError("too_large", f"{url} is larger than the limit of {max_bytes} bytes")
    return data


def _as_fetch_error(url: str, exc: Exception) -> Exception:
    if isinstance(exc, urllib.error.HTTPError):
        return FetchError("http_error", f"{url}: HTTP {exc.code}")
    reason = getattr(exc, "reason", exc)  # URLError wraps what the connection raised
    if isinstance(reason, FetchError):
        return reason
    if isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, UnicodeError)):
        return FetchError("unreachable", f"{url}: {reason}")
    return exc
