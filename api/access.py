"""Who may call the API: an optional API key and an optional list of client addresses.

Both checks run before any route. The health checks stay open without a key so supervisors and
load balancers can probe them (and the documentation with DOCS_PUBLIC), but they still obey
AUTHORIZED_URLS. No Flask here: the supervisor's 503 fallback makes the same decision.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from collections.abc import Iterable
from urllib.parse import parse_qs

from api.config import Settings
from api.errors import Forbidden, Unauthorized

log = logging.getLogger("api.access")

# Routes a supervisor or load balancer probes (the health checks of each interface): no API key needed.
METRICS_PATH = "/metrics"
OPEN_PATHS = frozenset({"/health", "/ready", "/v1/health", "/v1/health/", "/check", "/", "/api/version"})
DEEP_CHECK_PATH = "/health"  # with ?deep=1 it runs a generation: that needs the key like any other
DOCS_PATH = "/docs"
DOCUMENT_PATH = "/openapi.json"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _resolve(name: str) -> list[Network]:
    """Resolve a host name once, at start-up, to the addresses it stands for."""
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        log.warning("AUTHORIZED_URLS: cannot resolve host name %r; it authorizes nobody", name)
        return []
    return [ipaddress.ip_network(info[4][0].split("%")[0]) for info in infos]


def parse_networks(entries: Iterable[str]) -> list[Network]:
    networks: list[Network] = []
    for entry in entries:
        host = entry.split("://", 1)[-1].strip("[]").rstrip("/")  # tolerate "http://host" and "[::1]"
        try:
            networks.append(ipaddress.ip_network(host, strict=False))
        except ValueError:
            networks.extend(_resolve(host.split(":")[0]))
    return networks


def is_docs_path(path: str) -> bool:
    return path in (DOCS_PATH, DOCUMENT_PATH) or path.startswith(DOCS_PATH + "/")


def is_deep_check(path: str, query: str) -> bool:
    """`/health?deep=1`: the health check that runs a real one-token generation."""
    values = parse_qs(query, keep_blank_values=True).get("deep", [])
    return path == DEEP_CHECK_PATH and any(value.lower() not in ("0", "false", "no") for value in values)


def is_open(path: str, *, docs_public: bool, metrics_public: bool = False) -> bool:
    """Whether a path needs no API key: the one declaration, read by the workers, the supervisor's
    fallback and the OpenAPI document alike."""
    return path in OPEN_PATHS or (docs_public and is_docs_path(path)) or (metrics_public and path == METRICS_PATH)


class AccessPolicy:
    def __init__(self, api_key: str, authorized: Iterable[str], *, docs_public: bool = False,
                 metrics_public: bool = False) -> None:
        entries = tuple(authorized)
        self._key = api_key.encode()
        self._networks = parse_networks(entries)
        self._restricted = bool(entries)
        self._docs_public = docs_public
        self._metrics_public = metrics_public

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(settings.api_key, settings.authorized_urls, docs_public=settings.docs_public,
                   metrics_public=settings.metrics_public)

    def check(self, remote_addr: str | None, path: str, authorization: str | None, api_key_header: str | None,
              query: str = "") -> None:
        """The whole decision for one request: raises Forbidden (403) or Unauthorized (401), or returns."""
        self.check_client(remote_addr)
        if self.needs_key(path, query):
            self.check_key(authorization, api_key_header)

    def needs_key(self, path: str, query: str = "") -> bool:
        return not is_open(path, docs_public=self._docs_public, metrics_public=self._metrics_public) or is_deep_check(path, query)

    def check_client(self, remote_addr: str | None) -> None:
        if not self._restricted:
            return
        try:
            address = ipaddress.ip_address((remote_addr or "").split("%")[0])
        except ValueError:
            raise Forbidden("this client address is not authorized") from None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not any(address in network for network in self._networks):
            raise Forbidden(f"client {address} is not in AUTHORIZED_URLS")

    def check_key(self, authorization: str | None, api_key_header: str | None) -> None:
        if not self._key:
            return
        offered = api_key_header or ""
        if authorization and authorization[:7].lower() == "bearer ":
            offered = authorization[7:].strip()
        if not hmac.compare_digest(offered.encode(), self._key):
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-Api-Key)")
