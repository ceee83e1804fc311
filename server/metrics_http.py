"""The /metrics endpoint: Prometheus text over HTTP, or HTTPS, optionally behind credentials.

What a Prometheus scrape config can send (`scheme: https` with `tls_config`, `basic_auth`,
`authorization: {type: Bearer}`) is what this endpoint can ask for:
- TLS: ServeConfig.metrics_tls_cert / metrics_tls_key (the gRPC certificate fits, or another);
- credentials: ServeConfig.metrics_auth_file, a TOML file of bearer tokens and basic-auth users,
  by their sha256 (no secret on disk, as in the API key file):

      bearer_sha256 = ["9f86d081884c7d65..."]     # sha256 hex of each accepted token
      [[basic]]
      username = "prometheus"
      password_sha256 = "5e884898da280471..."     # sha256 hex of the password

A request without accepted credentials gets 401 (with a Basic challenge) and no metrics. No
response names the server's software or version (no `Server` header): the stock handler
announced "WSGIServer/0.2 CPython/3.11.x".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import ssl
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from feedloop.core.errors import ConfigError

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class MetricsCredentials:
    """Accepted credentials by sha256 hex digest: bearer tokens, and (username, password)."""

    bearer_sha256: frozenset[str] = frozenset()
    basic_sha256: frozenset[tuple[str, str]] = frozenset()

    def accepts(self, authorization: str | None) -> bool:
        """Whether an Authorization header value carries accepted credentials."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            return _any_equal(_sha256(value), self.bearer_sha256)
        if scheme == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return False
            username, sep, password = decoded.partition(":")
            if not sep:
                return False
            wanted = {digest for user, digest in self.basic_sha256 if user == username}
            return _any_equal(_sha256(password), wanted)
        return False


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _any_equal(digest: str, accepted: Iterable[str]) -> bool:
    # compare_digest on every candidate: no early exit tells a prober which prefix matched.
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(digest, candidate)
    return found


def _digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value.strip()) != 64 or set(value.strip().lower()) - _HEX:
        raise ConfigError(f"{where}: must be 64 hex digits (a sha256)")
    return value.strip().lower()


def load_metrics_credentials(path: Path) -> MetricsCredentials:
    """The credentials file (ConfigError naming what is wrong)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"metrics auth file {path}: {exc}") from None
    unknown = set(data) - {"bearer_sha256", "basic"}
    if unknown:
        raise ConfigError(f"metrics auth file {path}: unknown keys {sorted(unknown)}")
    tokens = data.get("bearer_sha256", [])
    if not isinstance(tokens, list):
        raise ConfigError(f"metrics auth file {path}: bearer_sha256 must be a list")
    bearer = {_digest(t, f"metrics auth file {path}, bearer_sha256") for t in tokens}
    users = data.get("basic", [])
    if not isinstance(users, list):
        raise ConfigError(f"metrics auth file {path}: [[basic]] must be tables")
    basic = set()
    for i, entry in enumerate(users):
        where = f"metrics auth file {path}, basic[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("username"), str):
            raise ConfigError(f"{where}: needs 'username' and 'password_sha256'")
        basic.add((entry["username"], _digest(entry.get("password_sha256"), where)))
    if not bearer and not basic:
        raise ConfigError(f"metrics auth file {path}: no credentials (bearer_sha256, [[basic]])")
    return MetricsCredentials(frozenset(bearer), frozenset(basic))


class _AnonymousServerHandler(ServerHandler):
    server_software = ""  # falsy: wsgiref sends no Server header


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's request handler without access logs or a software banner."""

    server_version = ""
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        # WSGIRequestHandler.handle, with the handler class that sends no Server header.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _AnonymousServerHandler(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # typeshed: BufferedIOBase, a binary IO
            self.get_stderr(),
            self.get_environ(),
            multithread=False,
        )
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back-pointer
        app = self.server.get_app()  # type: ignore[attr-defined]
        handler.run(app)


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per scrape (as prometheus_client's server does): a slow client, or a TLS
        # handshake that never finishes, must not hold up the next scrape.
        thread = threading.Thread(
            target=self._handle_one, args=(request, client_address), daemon=True
        )
        thread.start()

    def _handle_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


def _guarded(app: Callable[..., Any], credentials: MetricsCredentials) -> Callable[..., Any]:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not credentials.accepts(environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Basic realm="feedloop metrics"'),
                ],
            )
            return [b"credentials required\n"]
        return app(environ, start_response)

    return guarded


def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    credentials: MetricsCredentials | None = None,
) -> WSGIServer:
    """Start the endpoint on a thread of its own; the returned server's `server_port` is the
    bound port (port 0 picks one); stop it with shutdown() and server_close()."""
    app = make_wsgi_app(registry)
    if credentials is not None:
        app = _guarded(app, credentials)
    server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
    httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    if ssl_context is not None:
        # The handshake runs on the request's own thread, at its first read, not in accept():
        # a client that never finishes it cannot stop the endpoint accepting others.
        httpd.socket = ssl_context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
    threading.Thread(target=httpd.serve_forever, name="feedloop-metrics", daemon=True).start()
    return httpd
