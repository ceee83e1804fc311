"""The metrics endpoint: optional HTTPS and credentials, and no software banner (finding 9).

The metrics port stayed plain HTTP when gRPC used TLS or mTLS, asked for nothing, and answered
with "Server: WSGIServer/0.2 CPython/3.11.x". Here: HTTPS with its own certificate, bearer and
basic credentials as a Prometheus scrape config sends them, 401 otherwise, no Server header.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ssl
from pathlib import Path

import pytest
from client_tls import make_certificates, openssl_available
from server_harness import running_server, seeded_registry, test_config

from feedloop.core.errors import ConfigError
from feedloop.server.metrics_http import MetricsCredentials, load_metrics_credentials

TOKEN, USER, PASSWORD = "scrape-token", "prometheus", "s3cret"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def auth_file(path: Path) -> Path:
    path.write_text(
        f'bearer_sha256 = ["{sha(TOKEN)}"]\n'
        f'[[basic]]\nusername = "{USER}"\npassword_sha256 = "{sha(PASSWORD)}"\n',
        encoding="utf-8",
    )
    return path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_accept_exactly_the_declared_ones(tmp_path: Path) -> None:
    credentials = load_metrics_credentials(auth_file(tmp_path / "auth.toml"))
    assert credentials.accepts(f"Bearer {TOKEN}")
    assert credentials.accepts(basic(USER, PASSWORD))
    for wrong in (
        None,
        "",
        "Bearer",
        f"Bearer {TOKEN}x",
        basic(USER, TOKEN),
        basic("other", PASSWORD),
        "Basic not-base64!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        f"Token {TOKEN}",
    ):
        assert not credentials.accepts(wrong), wrong
    assert not MetricsCredentials().accepts(f"Bearer {TOKEN}")


@pytest.mark.parametrize(
    "text",
    ["", 'bearer_sha256 = ["abc"]', 'token = "x"', "[[basic]]\nusername = 'u'\n"],
)
def test_a_bad_credentials_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="metrics auth file"):
        load_metrics_credentials(path)


@pytest.mark.skipif(not openssl_available(), reason="needs the openssl CLI")
async def test_metrics_over_https_with_credentials_and_no_banner(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    (tmp_path / "certs").mkdir()
    certs = make_certificates(tmp_path / "certs")
    config = test_config(
        tmp_path,
        metrics_tls_cert=certs.server_cert,
        metrics_tls_key=certs.server_key,
        metrics_auth_file=auth_file(tmp_path / "auth.toml"),
    )
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(config, registry=registry) as live:
        port = live.server.metrics_port
        context = ssl.create_default_context(cafile=str(certs.ca_cert))

        def get(authorization: str | None) -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            headers = {"Authorization": authorization} if authorization else {}
            conn.request("GET", "/metrics", headers=headers)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            return response.status, dict(response.getheaders()), body

        for authorization in (f"Bearer {TOKEN}", basic(USER, PASSWORD)):
            status, headers, body = get(authorization)
            assert status == 200 and b"feedloop_generations_served" in body
            assert "Server" not in headers
        for authorization in (None, f"Bearer {TOKEN}-wrong", basic(USER, "wrong")):
            status, headers, body = get(authorization)
            assert status == 401 and b"feedloop_" not in body
            assert headers["WWW-Authenticate"].startswith("Basic")
            assert "Server" not in headers
        # Plain HTTP on the HTTPS port gets nothing.
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            plain.getresponse().read()
        plain.close()


async def test_plain_metrics_send_no_server_banner(tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as live:
        conn = http.client.HTTPConnection("127.0.0.1", live.server.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200 and b"feedloop_" in response.read()
        assert response.getheader("Server") is None
        conn.close()
