"""JWT verification (PyJWT): connection tokens and channel tokens.

Only the algorithms whose keys are configured are accepted: HS256 with
``token.hmac_secret``, RS256 with ``token.rsa_public_key``, ES256 with
``token.ecdsa_public_key``. ``alg: none`` and every other algorithm are
rejected before any signature check. ``exp`` and ``nbf`` are always checked
when present (NumericDates, fractions allowed; a token not valid yet counts as
expired, as in Centrifugo); ``aud``/``iss`` when configured;
``iat`` is not (a backend's clock may run ahead of ours).

Connection token claims: ``sub`` (user id, ``""`` = anonymous), ``exp``,
``info`` (any JSON, shown to other clients in presence and publications),
``channels`` (server-side subscriptions), ``meta`` (server-only JSON). Every
claim stays available as ``Credentials.claims`` (e.g. the telemetry claims
``device`` and ``devices``, or any claim named by a namespace's
``subscribe_claim``).
Channel token claims: ``sub`` (must equal the connection's user), ``channel``
(must equal the channel subscribed), ``exp``, ``info``.

Verified connection tokens are remembered (``token.cache_size`` of them, least
recently used out first): a device posting telemetry with its token, or a
client reconnecting with the one it had, is not verified again. The cache is
keyed by the whole token string, signature included, so only the very bytes
that passed are accepted again, until their ``exp`` (with the same leeway);
``nbf`` and ``iat`` can only become more valid with time. Refused tokens are
never remembered, nor tokens over ``MAX_CACHED_TOKEN`` bytes (which bounds the
cache's memory).
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
import orjson

from server.config import TokenConfig
from server.protocol.codec import compact

MAX_CACHED_TOKEN: Final = 4096  # bytes; longer tokens are verified every time (memory bound)
# Largest exp accepted (int64, as Go's Centrifugo holds it): past 64 bits the
# connect or subscribe reply's ttl cannot be encoded, and the reply would crash.
MAX_EXP: Final = 2**63 - 1
HMAC_ALG: Final = "HS256"
RSA_ALG: Final = "RS256"
ECDSA_ALG: Final = "ES256"


class TokenError(Exception):
    """The token is not acceptable. ``expired`` tells a refreshable expiry apart."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a valid connection token says about its holder.

    Shared by every use of the same token (see the module docstring): treat
    ``meta`` and ``claims`` as read-only.
    """

    user: str
    exp: int = 0  # unix seconds; 0 = never expires
    info: bytes | None = None  # raw JSON
    channels: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)  # every claim of the token, as decoded


@dataclass(frozen=True, slots=True)
class ChannelCredentials:
    user: str
    channel: str
    exp: int = 0
    info: bytes | None = None


class TokenVerifier:
    """Verifies tokens against the configured keys. Cheap enough for the IOLoop
    (one HMAC or one RSA/ECDSA verify per connect)."""

    def __init__(self, cfg: TokenConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._clock = clock
        self._verified: OrderedDict[str, Credentials] = OrderedDict()  # token -> credentials
        self._keys: dict[str, Any] = {}
        if cfg.hmac_secret:
            self._keys[HMAC_ALG] = cfg.hmac_secret
        # Public keys are parsed once here (the config checked them): given PEM text,
        # PyJWT parses it on every verify, a quarter of an RS256 check (117 -> 87 us).
        if cfg.rsa_public_key:
            self._keys[RSA_ALG] = _public_key(RSA_ALG, cfg.rsa_public_key)
        if cfg.ecdsa_public_key:
            self._keys[ECDSA_ALG] = _public_key(ECDSA_ALG, cfg.ecdsa_public_key)

        self._single: tuple[str, Any] | None = None
        if len(self._keys) == 1:
            self._single = next(iter(self._keys.items()))

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def _key_for(self, token: str) -> tuple[str, Any]:
        """The configured algorithm and key the token's header names. Raises ``TokenError``."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            raise TokenError(f"algorithm {alg!r} not allowed")
        return alg, key

    def _decode(self, token: str) -> dict[str, Any]:
        if not token:
            raise TokenError("empty token")
        if self._single is not None:
            # One key configured (the usual case): PyJWT refuses every other
            # algorithm itself, so the header is parsed a second time only to
            # name the algorithm of a refused token.
            alg, key = self._single
        else:
            alg, key = self._key_for(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._cfg.audience or None,
                issuer=self._cfg.issuer or None,
                leeway=self._cfg.leeway,
                # iat is not a validity bound (RFC 7519; Centrifugo ignores it): PyJWT
                # refuses an iat ahead of our clock, which a backend whose clock runs
                # a second ahead gives every fresh token, and 3500 ends the SDK for good.
                options={"verify_aud": bool(self._cfg.audience), "verify_iat": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired", expired=True) from None
        except jwt.ImmatureSignatureError:
            # nbf ahead of our clock (beyond the leeway): Centrifugo answers it as
            # expired, so the SDK fetches a fresh token and tries again instead of
            # giving up for good on an "invalid" one.
            raise TokenError("token not valid yet (nbf)", expired=True) from None
        except jwt.InvalidAlgorithmError:
            self._key_for(token)  # raises with the token's algorithm in the reason
            raise TokenError("algorithm not allowed") from None
        except jwt.InvalidSignatureError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        except jwt.DecodeError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        sub = claims.get("sub", "")
        if not isinstance(sub, str):
            raise TokenError("sub claim must be a string")
        if not _unicode(sub):
            raise TokenError("sub claim is not valid Unicode")
        _expiry(claims)  # raises for a bad exp
        return claims

    def connection(self, token: str) -> Credentials:
        """Verify a connection token (or find it verified already). Raises ``TokenError``."""
        verified = self._verified
        creds = verified.get(token)
        if creds is not None:
            # PyJWT's rule: expired once exp <= now - leeway.
            if creds.exp and creds.exp <= self._clock() - self._cfg.leeway:
                del verified[token]
                raise TokenError("token expired", expired=True)
            verified.move_to_end(token)
            return creds
        creds = self._verify_connection(token)
        if self._cfg.cache_size and len(token) <= MAX_CACHED_TOKEN:
            verified[token] = creds
            if len(verified) > self._cfg.cache_size:
                verified.popitem(last=False)
        return creds

    def _verify_connection(self, token: str) -> Credentials:
        claims = self._decode(token)
        channels = claims.get("channels", [])
        if not isinstance(channels, list) or not all(
            isinstance(c, str) and _unicode(c) for c in channels
        ):
            raise TokenError("channels claim must be a list of strings")
        meta = claims.get("meta", {})
        if not isinstance(meta, dict):
            raise TokenError("meta claim must be an object")
        return Credentials(
            user=claims.get("sub", ""),
            exp=_expiry(claims),
            info=_raw_json(claims, "info"),
            channels=tuple(channels),
            meta=meta,
            claims=claims,
        )

    def channel(self, token: str, *, user: str, channel: str) -> ChannelCredentials:
        """Verify a channel token for ``channel`` held by ``user``. Raises ``TokenError``."""
        claims = self._decode(token)
        if claims.get("channel") != channel:
            raise TokenError("token is for another channel")
        if claims.get("sub", "") != user:
            raise TokenError("token is for another user")
        return ChannelCredentials(
            user=user, channel=channel, exp=_expiry(claims), info=_raw_json(claims, "info")
        )


def _public_key(alg: str, pem: str) -> Any:
    """The PEM public key as the key object PyJWT's ``alg`` verifies with."""
    return jwt.get_algorithm_by_name(alg).prepare_key(pem)


def claim_globs_match(claims: Mapping[str, Any], claim: str, name: str) -> bool:
    """Whether the token claim ``claim`` (a list of glob patterns) matches ``name``.

    Patterns use ``fnmatch`` syntax, case-sensitive (``*``, ``?``, ``[seq]``).
    A missing claim, or one that is not a list of strings, matches nothing.
    """
    if not claim:
        return False
    patterns = claims.get(claim)
    if not isinstance(patterns, list):
        return False
    return any(isinstance(p, str) and fnmatch.fnmatchcase(name, p) for p in patterns)


def _expiry(claims: Mapping[str, Any]) -> int:
    """The ``exp`` claim in whole unix seconds (0 when absent). Raises ``TokenError``.

    A NumericDate may have a fraction (RFC 7519; PyJWT accepts one). It is
    floored, as PyJWT truncates it before its check: the token has expired once
    floor(exp) <= now - leeway, which is also what the cache checks later with
    ``Credentials.exp``, and what the connection's TTL counts down to.
    """
    exp = claims.get("exp", 0)
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise TokenError("exp claim must be a number")
    if exp > MAX_EXP:
        raise TokenError("exp claim out of range")
    return math.floor(exp)


def _unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode. A token's JSON may hold a lone surrogate
    (``"\\ud800"``) that no JSON reply or BSON document can carry: as a user or
    device id it made every reply naming it fail (``GET /api/devices`` a 500 for
    every dashboard that may see the device)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _raw_json(claims: dict[str, Any], key: str) -> bytes | None:
    """The claim as compact JSON. Raises ``TokenError`` for JSON that PyJWT decodes
    but orjson cannot encode (an integer past 64 bits, nesting deeper than 254)."""
    if key not in claims:
        return None
    try:
        return compact(orjson.dumps(claims[key]))  # kept for the connection's life
    except orjson.JSONEncodeError as exc:
        raise TokenError(f"{key} claim cannot be encoded: {exc}") from None


def make_token(
    secret: str,
    sub: str,
    *,
    ttl: float | None = 3600,
    channel: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign an HS256 token (development helper behind ``run.py token``)."""
    claims: dict[str, Any] = {"sub": sub, **(extra or {})}
    if ttl:
        claims["exp"] = math.ceil(time.time() + ttl)  # int() made --ttl 0.5 expired at once
    if channel is not None:
        claims["channel"] = channel
    return jwt.encode(claims, secret, algorithm=HMAC_ALG)
