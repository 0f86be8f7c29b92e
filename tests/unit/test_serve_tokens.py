"""Request ids (serve/tokens.py): what they bind, and every way a forged, stale or borrowed one is refused."""

from __future__ import annotations

import base64
import json

import pytest

from serve.tokens import MIN_SECRET_BYTES, RequestSigner, TokenError, new_secret, resolve_secret

SECRET = b"s" * MIN_SECRET_BYTES
NOW = 1_800_000_000.0
CANDIDATES = [f"item-{k}" for k in range(100)]


def _signer(secret: bytes = SECRET, window_s: float = 600) -> RequestSigner:
    return RequestSigner(secret, window_s)


def _reason(token: str, now: float = NOW, signer: RequestSigner | None = None) -> str:
    with pytest.raises(TokenError) as err:
        (signer or _signer()).verify(token, now)
    return err.value.reason


def test_a_request_id_names_user_arm_version_time_and_exactly_the_candidates():
    token = _signer().issue("u1", "marn", "v0003", CANDIDATES, NOW)
    served = _signer().verify(token, NOW + 1)
    assert (served.user_id, served.arm, served.model_version, served.issued_at) == (
        "u1",
        "marn",
        "v0003",
        NOW,
    )
    assert all(served.served(item) for item in CANDIDATES)
    assert not any(served.served(f"other-{k}") for k in range(1000))
    assert len(token) < 1500  # 100 candidates: small enough to send back with every click


def test_identical_requests_get_different_ids():
    first, second = (_signer().issue("u1", "marn", "v1", CANDIDATES, NOW) for _ in range(2))
    assert first != second
    assert _signer().verify(first, NOW).key != _signer().verify(second, NOW).key


def _tampered(token: str, **changes) -> str:
    version, fields, digests, mac = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(fields + "=" * (-len(fields) % 4)))
    body.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{version}.{forged}.{digests}.{mac}"


def test_any_change_to_a_signed_id_is_refused_as_forged():
    token = _signer().issue("u1", "dupn", "v1", CANDIDATES, NOW)
    assert _reason(_tampered(token, u="u2")) == "forged"
    assert _reason(_tampered(token, a="marn")) == "forged"
    assert _reason(_tampered(token, t=NOW + 10_000)) == "forged"
    assert _reason(token, signer=_signer(b"t" * MIN_SECRET_BYTES)) == "forged"  # another secret
    version, fields, digests, mac = token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    assert _reason(f"{version}.{fields}.{digests}.{flipped}") == "forged"
    other_items = base64.urlsafe_b64encode(b"\0" * 8).rstrip(b"=").decode()  # a digest of the attacker's
    assert _reason(f"{version}.{fields}.{digests + other_items}.{mac}") == "forged"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "v1.x",
        "v2.abc.def.ghi",
        "v1.abc.def.g!i",
        "v1.abc.def",
        "v1.a.b.c.d",
        "v1.é.abc.def",
        "v1." + "a" * 70_000 + ".b.c",
    ],
)
def test_malformed_ids_are_refused_before_anything_is_decoded(token):
    assert _reason(token) in {"malformed", "forged"}


def test_ids_expire_after_the_window_and_ids_from_the_future_are_refused():
    token = _signer(window_s=600).issue("u1", "marn", "v1", CANDIDATES, NOW)
    assert _signer(window_s=600).verify(token, NOW + 599).user_id == "u1"
    assert _reason(token, NOW + 601, _signer(window_s=600)) == "expired"
    assert _reason(token, NOW - 3600) == "clock_skew"


def test_the_secret_must_come_from_the_environment_and_be_long_enough(monkeypatch):
    monkeypatch.delenv("MARN_TEST_SECRET", raising=False)
    with pytest.raises(RuntimeError, match="MARN_TEST_SECRET"):
        resolve_secret("MARN_TEST_SECRET")
    monkeypatch.setenv("MARN_TEST_SECRET", "short")
    with pytest.raises(RuntimeError, match="at least 32 bytes"):
        resolve_secret("MARN_TEST_SECRET")
    monkeypatch.setenv("MARN_TEST_SECRET", new_secret())
    assert len(resolve_secret("MARN_TEST_SECRET")) >= MIN_SECRET_BYTES
    with pytest.raises(ValueError):
        RequestSigner(b"short", 60)
