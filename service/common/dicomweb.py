"""DICOMweb clients (``dicomweb-client``) for our peers, from the one set of settings:
authentication (a Bearer token, or a user and password, each read from a file),
TLS against a site CA, our certificate where one is configured, and timeouts.

Secrets are read from their files when a client is made, so a rotated token is used
from the next request on; they live in the session's auth object, whose ``repr``
does not show them, and are never logged.
"""

from __future__ import annotations

from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth

from service.settings import DicomWebDestination, Settings


class BearerAuth(AuthBase):
    """``Authorization: Bearer <token>`` on every request."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


class SiteCaAdapter(HTTPAdapter):
    """Verifies every HTTPS peer against one CA bundle. ``session.verify`` would not
    do: requests lets ``REQUESTS_CA_BUNDLE`` (set in many containers) override it."""

    def __init__(self, ca_bundle: Path) -> None:
        super().__init__()
        self._ca_bundle = str(ca_bundle)

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
        kwargs["verify"] = self._ca_bundle
        return super().send(request, **kwargs)  # type: ignore[arg-type]


def read_secret(path: Path, setting: str) -> str:
    """The secret in ``path`` (one line; surrounding white space dropped)."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"setting {setting}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"setting {setting}: {path} is empty")
    return secret


def auth(settings: Settings) -> AuthBase | None:
    """The authentication the settings configure, or ``None``."""
    if settings.dicomweb_token_file is not None:
        return BearerAuth(read_secret(settings.dicomweb_token_file, "dicomweb_token_file"))
    if settings.dicomweb_user and settings.dicomweb_password_file is not None:
        return HTTPBasicAuth(
            settings.dicomweb_user, read_secret(settings.dicomweb_password_file, "dicomweb_password_file")
        )
    return None


def client(settings: Settings, peer: DicomWebDestination) -> DICOMwebClient:
    """A client for ``peer``. It does not retry by itself: the outbox retries with
    its own backoff, and a fill reports what it could not fetch."""
    session = requests.Session()
    session.auth = auth(settings)
    if settings.dicomweb_ca is not None:
        session.mount("https://", SiteCaAdapter(settings.dicomweb_ca))
    if settings.tls_cert is not None and settings.tls_key is not None:
        session.cert = (str(settings.tls_cert), str(settings.tls_key))  # mutual TLS, as for DICOM TLS
    web = DICOMwebClient(peer.url, session=session, timeout=settings.dicomweb_timeout_s)
    web.set_http_retry_params(retry=False)
    return web
