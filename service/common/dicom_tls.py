"""DICOM TLS (PS3.15 B.1) for our associations, as acceptor and as requestor, from
the one set of settings (``tls_cert``, ``tls_key``, ``tls_ca``)."""

from __future__ import annotations

import ssl

from service.settings import Destination, Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The receiver's context when a certificate is configured; with ``tls_ca``
    every client must present a certificate signed by it."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.tls_ca)
    return context


def client_args(settings: Settings, peer: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for calling ``peer``: ``None`` unless it is written
    ``+tls``. The peer is verified against ``tls_ca`` (or the system's CAs); our
    certificate is presented when one is configured (mutual TLS)."""
    if not peer.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca)
    if settings.tls_cert and settings.tls_key:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context, peer.host
