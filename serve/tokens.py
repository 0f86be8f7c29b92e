"""Request ids: HMAC-signed tokens that bind feedback to the response it is about.

``/predict`` answers with a ``request_id`` naming the user, the arm and model version that answered, the
candidates scored (8-byte BLAKE2b digests, so the id stays small) and the time. ``/feedback`` must send it
back; the router checks the signature (constant time), the age, the user and that the item was a candidate
of that response. Replays of one (request, item) are refused by the ledger, which outlives any router.

Format: ``v1.<fields>.<digests>.<mac>``, each part base64url: fields is JSON (user, arm, version, time,
nonce), digests the candidates' digests back to back, mac = HMAC-SHA256(secret, "marn-request." + fields +
"." + digests). Only this service writes the fields: nothing of an unsigned token is ever parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass

VERSION = "v1"
DIGEST_BYTES = 8  # per candidate: a forged item must collide with one of <= 1,000 digests, 2**-54 a try
MIN_SECRET_BYTES = 32
CLOCK_SKEW_S = 60.0  # router replicas' clocks may disagree by this much
MAX_TOKEN_CHARS = 64_000  # 1,000 candidates: about 11,000 characters
_CONTEXT = b"marn-request."


class TokenError(ValueError):
    """Why a request id is refused; ``reason`` is the key it is counted under in ``GET /ab``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ServedRequest:
    """What one ``/predict`` response served, as its request id names it."""

    user_id: str
    arm: str
    model_version: str
    candidate_digests: frozenset[bytes]
    issued_at: float  # unix seconds
    key: str  # the signature, hex: unique per response, the replay ledger's request key

    def served(self, item_id: str) -> bool:
        return candidate_digest(item_id) in self.candidate_digests


def candidate_digest(item_id: str) -> bytes:
    return hashlib.blake2b(item_id.encode("utf-8"), digest_size=DIGEST_BYTES).digest()


def resolve_secret(env_name: str) -> bytes:
    """The signing secret from the environment variable ``env_name``; a clear error when unusable."""
    value = os.environ.get(env_name, "")
    if len(value.encode("utf-8")) < MIN_SECRET_BYTES:
        raise RuntimeError(
            f"${env_name} must hold the request-signing secret, at least {MIN_SECRET_BYTES} bytes "
            f"(got {len(value)} characters): `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return value.encode("utf-8")


def new_secret() -> str:
    return secrets.token_urlsafe(MIN_SECRET_BYTES)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class RequestSigner:
    """Issues and checks request ids with one secret (every router replica gets the same one)."""

    def __init__(self, secret: bytes, window_s: float):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the signing secret must be at least {MIN_SECRET_BYTES} bytes")
        if not window_s > 0:
            raise ValueError(f"the feedback window must be positive, got {window_s}")
        self._secret, self.window_s = secret, window_s

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._secret, _CONTEXT + payload.encode("ascii"), hashlib.sha256).digest()

    def issue(self, user_id: str, arm: str, model_version: str, candidates: list[str], now: float) -> str:
        fields = {
            "u": user_id,
            "a": arm,
            "m": model_version,
            "t": round(now, 3),
            "n": secrets.token_hex(8),  # two identical requests get different ids
        }
        digests = b"".join(candidate_digest(item) for item in candidates)
        payload = f"{_b64(json.dumps(fields, separators=(',', ':')).encode('utf-8'))}.{_b64(digests)}"
        return f"{VERSION}.{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str, now: float) -> ServedRequest:
        """The request a genuine, unexpired id names; TokenError (malformed, forged, expired) otherwise."""
        parts = token.split(".") if len(token) <= MAX_TOKEN_CHARS else []
        if len(parts) != 4 or parts[0] != VERSION or not token.isascii():
            raise TokenError("malformed", "request_id is not one this service issued")
        try:
            signature = _unb64(parts[3])
        except (binascii.Error, ValueError) as err:
            raise TokenError("malformed", "request_id is not one this service issued") from err
        payload = f"{parts[1]}.{parts[2]}"
        if not hmac.compare_digest(signature, self._mac(payload)):
            raise TokenError("forged", "request_id signature does not match")
        body = json.loads(_unb64(parts[1]))  # signed by us: well-formed by construction
        issued = float(body["t"])
        if now > issued + self.window_s:
            raise TokenError("expired", f"feedback window of {self.window_s:g} s has passed")
        if issued > now + CLOCK_SKEW_S:
            raise TokenError("clock_skew", "request_id issued in the future (router clocks disagree)")
        raw = _unb64(parts[2])
        digests = frozenset(raw[k : k + DIGEST_BYTES] for k in range(0, len(raw), DIGEST_BYTES))
        return ServedRequest(body["u"], body["a"], body["m"], digests, issued, signature.hex())
