"""The one Bearer check (service.common.bearer) that STOW-RS and the ops app share."""

from __future__ import annotations

import pytest

from service.common.bearer import bearer_credential, token_matches


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        ("Bearer s3cret", "s3cret"),
        ("bearer  s3cret ", "s3cret"),  # the scheme in any case, the token stripped
        ("Basic dXNlcjpwdw==", None),
        ("Bearer", ""),
        ("", None),
        (None, None),
    ],
)
def test_the_credential_of_an_authorization_header(header: str | None, credential: str | None) -> None:
    assert bearer_credential(header) == credential


def test_tokens_match_only_when_equal_and_set() -> None:
    assert token_matches("s3cret", "s3cret")
    assert not token_matches("s3cre", "s3cret") and not token_matches("S3CRET", "s3cret")
    assert not token_matches("", "")  # a node without a token lets no one in
