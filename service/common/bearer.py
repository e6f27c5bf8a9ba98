"""The one Bearer check of the node's HTTP side: STOW-RS (:mod:`service.ingest.stow`)
and the ops app (:mod:`service.ops.web`) read ``Authorization`` and compare tokens
the same way, and answer a refusal with the same challenge."""

from __future__ import annotations

import hmac

#: The challenge a 401 carries (RFC 6750).
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sonocase"'}


def bearer_credential(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any
    case), None for a missing header or another scheme."""
    scheme, _, credential = (authorization or "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None


def token_matches(given: str, token: str) -> bool:
    """Whether ``given`` is ``token``, compared in constant time; an unset (empty)
    token matches nothing, so a node without one lets no one in."""
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())
