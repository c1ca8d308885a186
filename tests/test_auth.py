"""``TokenVerifier``: which JWTs open a connection or a channel, and which are refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.auth import (
    MAX_CACHED_TOKEN,
    ChannelCredentials,
    Credentials,
    TokenError,
    TokenVerifier,
    make_token,
)
from server.config import TokenConfig

SECRET = "auth-test-secret-0123456789-0123456789"
OTHER_SECRET = "another-secret-0123456789-0123456789-xyz"


def pem_public(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(claims: dict[str, Any], key: bytes) -> str:
    """HS256 signed with any bytes as the secret (PyJWT refuses PEM keys as HMAC secrets)."""
    signing_input = (
        b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + "." + b64(orjson.dumps(claims))
    )
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


def verifier(**kw: Any) -> TokenVerifier:
    kw.setdefault("hmac_secret", SECRET)
    return TokenVerifier(TokenConfig(**kw))


def refused(v: TokenVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        v.connection(token)
    return info.value


def future(seconds: int = 3600) -> int:
    return int(time.time()) + seconds


# ---------------------------------------------------------------------- accepted tokens


def test_hs256_connection_token_gives_credentials():
    """A valid HS256 token yields its user, expiry, info, server-side channels and meta."""
    exp = future()
    token = hs256(
        {
            "sub": "alice",
            "exp": exp,
            "info": {"name": "Alice"},
            "channels": ["news", "chat:lobby"],
            "meta": {"plan": "pro"},
        }
    )
    creds = verifier().connection(token)
    assert isinstance(creds, Credentials)
    assert creds.user == "alice"
    assert creds.exp == exp
    assert creds.info == b'{"name":"Alice"}'
    assert creds.channels == ("news", "chat:lobby")
    assert creds.meta == {"plan": "pro"}


def test_token_without_exp_never_expires():
    """A token with no exp gives exp 0 (the connection never expires)."""
    creds = verifier().connection(hs256({"sub": "bob"}))
    assert creds.exp == 0
    assert creds.info is None
    assert creds.channels == ()


def test_fractional_numeric_dates_are_accepted():
    """RFC 7519 NumericDates may have fractions (PyJWT accepts them): exp, nbf and iat
    with a fraction are valid; exp is kept in whole seconds, rounded down, so the
    connection never outlives the token."""
    exp = future() + 0.75
    claims = {"sub": "alice", "exp": exp, "nbf": time.time() - 1.5, "iat": time.time() - 0.5}
    creds = verifier().connection(hs256(claims))
    assert creds.user == "alice"
    assert creds.exp == int(exp)
    assert isinstance(creds.exp, int)
    chan = verifier().channel(hs256({**claims, "channel": "news"}), user="alice", channel="news")
    assert chan.exp == int(exp)


def test_fractional_exp_that_has_passed_is_expired():
    """A fractional exp in the past is refused as expired (refreshable), not as invalid."""
    exc = refused(verifier(), hs256({"sub": "alice", "exp": time.time() - 10.5}))
    assert exc.expired


def test_token_without_sub_is_anonymous():
    """A token without sub is the anonymous user ''."""
    assert verifier().connection(hs256({"exp": future()})).user == ""


def test_make_token_round_trips():
    """The development helper (`run.py token`) makes tokens the verifier accepts."""
    v = verifier()
    assert v.connection(make_token(SECRET, "carol", ttl=60)).user == "carol"
    creds = v.channel(
        make_token(SECRET, "carol", channel="private:x"), user="carol", channel="private:x"
    )
    assert creds.channel == "private:x"


def test_rs256_token_with_configured_public_key(rsa_key):
    """RS256 tokens verify against token.rsa_public_key."""
    v = verifier(hmac_secret="", rsa_public_key=pem_public(rsa_key))
    token = jwt.encode({"sub": "alice", "exp": future()}, rsa_key, algorithm="RS256")
    assert v.connection(token).user == "alice"
    assert v.algorithms == ("RS256",)


def test_es256_token_with_configured_public_key(ec_key):
    """ES256 tokens verify against token.ecdsa_public_key."""
    v = verifier(hmac_secret="", ecdsa_public_key=pem_public(ec_key))
    token = jwt.encode({"sub": "alice", "exp": future()}, ec_key, algorithm="ES256")
    assert v.connection(token).user == "alice"
    assert v.algorithms == ("ES256",)


def test_all_three_algorithms_side_by_side(rsa_key, ec_key):
    """With every key configured, each algorithm verifies with its own key."""
    v = verifier(rsa_public_key=pem_public(rsa_key), ecdsa_public_key=pem_public(ec_key))
    assert set(v.algorithms) == {"HS256", "RS256", "ES256"}
    assert v.connection(hs256({"sub": "h"})).user == "h"
    assert v.connection(jwt.encode({"sub": "r"}, rsa_key, algorithm="RS256")).user == "r"
    assert v.connection(jwt.encode({"sub": "e"}, ec_key, algorithm="ES256")).user == "e"


# ---------------------------------------------------------------------- refused tokens


def test_alg_none_is_rejected():
    """An unsigned token (alg: none) is never accepted."""
    token = jwt.encode({"sub": "mallory"}, None, algorithm="none")
    exc = refused(verifier(), token)
    assert not exc.expired
    assert "none" in exc.reason


def test_alg_none_with_hand_made_header_is_rejected():
    """``{"alg": "none"}`` with an empty or bogus signature is rejected either way."""
    body = b64(orjson.dumps({"alg": "none", "typ": "JWT"})) + "." + b64(orjson.dumps({"sub": "m"}))
    refused(verifier(), body + ".")
    refused(verifier(), body + "." + b64(b"sig"))


def test_hs256_signed_with_rsa_public_key_is_rejected(rsa_key):
    """Algorithm confusion: an HS256 token keyed with the RSA public PEM is refused."""
    pem = pem_public(rsa_key)
    token = hand_signed_hs256({"sub": "mallory", "exp": future()}, pem.encode())
    exc = refused(verifier(hmac_secret="", rsa_public_key=pem), token)
    assert "HS256" in exc.reason


def test_hs256_signed_with_rsa_public_key_is_rejected_when_hmac_also_configured(rsa_key):
    """With HS256 enabled too, the RSA public key still is not an HMAC secret."""
    pem = pem_public(rsa_key)
    token = hand_signed_hs256({"sub": "mallory"}, pem.encode())
    refused(verifier(rsa_public_key=pem), token)


def test_algorithm_without_configured_key_is_rejected(rsa_key, ec_key):
    """Only algorithms whose key is configured are accepted (RS256/ES256/HS384 here are
    not), and the reason names the token's algorithm."""
    v = verifier()
    hs384_key = SECRET + "-longer-for-hs384-0123456789"
    for alg, token in (
        ("RS256", jwt.encode({"sub": "x"}, rsa_key, algorithm="RS256")),
        ("ES256", jwt.encode({"sub": "x"}, ec_key, algorithm="ES256")),
        ("HS384", jwt.encode({"sub": "x"}, hs384_key, algorithm="HS384")),
    ):
        assert refused(v, token).reason == f"algorithm {alg!r} not allowed"


def test_refusal_reasons_do_not_depend_on_how_many_keys_are_configured(rsa_key, ec_key):
    """One key (PyJWT refuses other algorithms itself) or several (the header picks the
    key): the same token gets the same reason."""
    one = verifier()
    two = verifier(rsa_public_key=pem_public(rsa_key))
    cases = [
        ("abc", "malformed token: "),
        ("eyJhbGciOiJIUzI1NiJ9.x.y", "malformed token: "),
        (hs256({"sub": "a"}, OTHER_SECRET), "invalid token: Signature verification failed"),
        (jwt.encode({"sub": "x"}, ec_key, algorithm="ES256"), "algorithm 'ES256' not allowed"),
        (hs256({"sub": "a", "exp": int(time.time()) - 3600}), "token expired"),
    ]
    for token, reason in cases:
        for v in (one, two):
            assert refused(v, token).reason.startswith(reason), (v.algorithms, token)


def test_wrong_hmac_secret_is_rejected():
    """A token signed with another secret is refused (and not as expired)."""
    exc = refused(verifier(), hs256({"sub": "alice", "exp": future()}, OTHER_SECRET))
    assert not exc.expired


def test_wrong_rsa_key_is_rejected(rsa_key):
    """An RS256 token signed by a different private key is refused."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    v = verifier(hmac_secret="", rsa_public_key=pem_public(rsa_key))
    refused(v, jwt.encode({"sub": "alice"}, other, algorithm="RS256"))


def test_wrong_ecdsa_key_is_rejected(ec_key):
    """An ES256 token signed by a different private key is refused."""
    other = ec.generate_private_key(ec.SECP256R1())
    v = verifier(hmac_secret="", ecdsa_public_key=pem_public(ec_key))
    refused(v, jwt.encode({"sub": "alice"}, other, algorithm="ES256"))


def test_tampered_payload_is_rejected():
    """Changing the claims of a signed token breaks its signature."""
    header, _, sig = hs256({"sub": "alice"}).split(".")
    forged = header + "." + b64(orjson.dumps({"sub": "admin"})) + "." + sig
    refused(verifier(), forged)


def test_expired_token_is_flagged_expired():
    """An expired but otherwise valid token is refused with expired=True (the SDK refreshes)."""
    exc = refused(verifier(), hs256({"sub": "alice", "exp": int(time.time()) - 10}))
    assert exc.expired


def test_expired_token_with_wrong_signature_is_not_flagged_expired():
    """Only a genuine token may look expired: a forged one is just invalid."""
    exc = refused(verifier(), hs256({"sub": "alice", "exp": int(time.time()) - 10}, OTHER_SECRET))
    assert not exc.expired


def test_leeway_tolerates_clock_skew():
    """token.leeway accepts a token that expired a moment ago."""
    token = hs256({"sub": "alice", "exp": int(time.time()) - 5})
    assert verifier(leeway=60).connection(token).user == "alice"
    assert refused(verifier(), token).expired


def test_nbf_in_the_future_counts_as_expired():
    """A token that is not valid yet (nbf ahead) is refused as expired, as Centrifugo
    does: the SDK then fetches a new token instead of giving up on an invalid one."""
    exc = refused(verifier(), hs256({"sub": "alice", "nbf": future(600)}))
    assert exc.expired
    assert verifier(leeway=700).connection(hs256({"sub": "alice", "nbf": future(600)})).user
    assert verifier().connection(hs256({"sub": "alice", "nbf": int(time.time()) - 1})).user


def test_audience_enforced_when_configured():
    """With token.audience set, tokens must carry that aud."""
    v = verifier(audience="squall")
    assert v.connection(hs256({"sub": "a", "aud": "squall"})).user == "a"
    assert v.connection(hs256({"sub": "a", "aud": ["other", "squall"]})).user == "a"
    refused(v, hs256({"sub": "a", "aud": "other"}))
    refused(v, hs256({"sub": "a"}))


def test_audience_ignored_when_not_configured():
    """Without token.audience, an aud claim does not matter."""
    assert verifier().connection(hs256({"sub": "a", "aud": "anything"})).user == "a"


def test_issuer_enforced_when_configured():
    """With token.issuer set, tokens must carry that iss."""
    v = verifier(issuer="https://auth.example")
    assert v.connection(hs256({"sub": "a", "iss": "https://auth.example"})).user == "a"
    refused(v, hs256({"sub": "a", "iss": "https://evil.example"}))
    refused(v, hs256({"sub": "a"}))


def test_issuer_ignored_when_not_configured():
    """Without token.issuer, an iss claim does not matter."""
    assert verifier().connection(hs256({"sub": "a", "iss": "whoever"})).user == "a"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.x.y"])
def test_malformed_token_is_rejected(token):
    """Garbage in place of a token is refused as invalid (never a crash)."""
    assert not refused(verifier(), token).expired


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": 42},
        {"sub": "a", "exp": "tomorrow"},
        {"sub": "a", "exp": str(future())},
        {"sub": "a", "exp": True},
        {"sub": "a", "exp": None},
        {"sub": "a", "channels": "news"},
        {"sub": "a", "channels": ["news", 1]},
        {"sub": "a", "meta": ["x"]},
    ],
)
def test_badly_typed_claims_are_rejected(claims):
    """Claims of the wrong type make the token invalid instead of confusing the server."""
    refused(verifier(), hs256(claims))


def test_no_keys_configured_accepts_nothing():
    """With no key at all, every token is refused."""
    v = TokenVerifier(TokenConfig())
    assert v.algorithms == ()
    refused(v, hs256({"sub": "alice"}))


# ---------------------------------------------------------------------- channel tokens


def test_channel_token_for_the_right_user_and_channel():
    """A channel token names the user and the channel; its info becomes chan_info."""
    exp = future()
    token = hs256({"sub": "alice", "channel": "private:x", "exp": exp, "info": {"role": "mod"}})
    creds = verifier().channel(token, user="alice", channel="private:x")
    assert creds == ChannelCredentials("alice", "private:x", exp, b'{"role":"mod"}')


def test_channel_token_for_another_channel_is_rejected():
    """A token for one channel does not open another."""
    token = hs256({"sub": "alice", "channel": "private:x"})
    with pytest.raises(TokenError, match="channel"):
        verifier().channel(token, user="alice", channel="private:y")


def test_channel_token_without_channel_claim_is_rejected():
    """A connection token is not a channel token."""
    with pytest.raises(TokenError):
        verifier().channel(hs256({"sub": "alice"}), user="alice", channel="private:x")


def test_channel_token_for_another_user_is_rejected():
    """A channel token minted for bob does not work on alice's connection."""
    token = hs256({"sub": "bob", "channel": "private:x"})
    with pytest.raises(TokenError, match="user"):
        verifier().channel(token, user="alice", channel="private:x")


def test_anonymous_channel_token_needs_anonymous_connection():
    """A channel token without sub only fits an anonymous connection."""
    token = hs256({"channel": "private:x"})
    assert verifier().channel(token, user="", channel="private:x").user == ""
    with pytest.raises(TokenError):
        verifier().channel(token, user="alice", channel="private:x")


def test_expired_channel_token_is_flagged_expired():
    """An expired channel token says so, so the SDK can fetch a new one."""
    token = hs256({"sub": "alice", "channel": "private:x", "exp": int(time.time()) - 1})
    with pytest.raises(TokenError) as info:
        verifier().channel(token, user="alice", channel="private:x")
    assert info.value.expired


def test_channel_token_signed_with_wrong_key_is_rejected():
    """Channel tokens are verified like connection tokens."""
    token = hs256({"sub": "alice", "channel": "private:x"}, OTHER_SECRET)
    with pytest.raises(TokenError) as info:
        verifier().channel(token, user="alice", channel="private:x")
    assert not info.value.expired


# ---------------------------------------------------------------------- verified-token cache


class DecodeCounter:
    """Counts the signature checks PyJWT is asked for (jwt.decode, wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr("server.auth.jwt.decode", counting)


def test_a_verified_token_is_not_verified_again(monkeypatch):
    """The same token string again (a device posting telemetry, a client reconnecting)
    gets the same credentials without another signature check."""
    decodes = DecodeCounter(monkeypatch)
    v = verifier()
    token = hs256({"sub": "pump-1", "device": True, "exp": future()})
    first = v.connection(token)
    assert v.connection(token) is first
    assert decodes.calls == 1
    other = hs256({"sub": "pump-2", "device": True, "exp": future()})
    assert v.connection(other).user == "pump-2"
    assert decodes.calls == 2


def test_a_remembered_token_still_expires_with_the_same_leeway():
    """Once its exp has passed (by PyJWT's rule, exp <= now - leeway), a remembered
    token is refused as expired, like one seen for the first time."""
    now = [time.time()]
    exp = int(now[0]) + 100
    token = hs256({"sub": "alice", "exp": exp})
    strict = TokenVerifier(TokenConfig(hmac_secret=SECRET), clock=lambda: now[0])
    lenient = TokenVerifier(TokenConfig(hmac_secret=SECRET, leeway=60), clock=lambda: now[0])
    for v in (strict, lenient):
        assert v.connection(token).user == "alice"
    now[0] = exp  # expired (exp <= now), but within the lenient verifier's leeway
    assert lenient.connection(token).user == "alice"
    exc = refused(strict, token)
    assert exc.expired
    assert exc.reason == "token expired"
    now[0] = exp + 59.9
    assert lenient.connection(token).user == "alice"
    now[0] = exp + 60
    assert refused(lenient, token).expired
    # Forgotten once expired: with the real clock (before exp) it is verified afresh.
    assert TokenVerifier(TokenConfig(hmac_secret=SECRET)).connection(token).user == "alice"


def test_a_remembered_fractional_exp_expires_like_pyjwt_says():
    """A remembered token with exp = E.9 expires when PyJWT would refuse it afresh: once
    E <= now - leeway (PyJWT drops the fraction), not 0.9 s later nor earlier."""
    now = [time.time()]
    whole = int(now[0]) + 100
    token = hs256({"sub": "alice", "exp": whole + 0.9})
    for leeway in (0.0, 30.0):
        v = TokenVerifier(TokenConfig(hmac_secret=SECRET, leeway=leeway), clock=lambda: now[0])
        now[0] = time.time()
        assert v.connection(token).exp == whole
        now[0] = whole + leeway - 0.01
        assert v.connection(token).user == "alice"
        now[0] = whole + leeway
        assert refused(v, token).expired
    # PyJWT agrees at the same instants (its clock is the real one: shift exp instead).
    fresh = verifier()
    assert refused(fresh, hs256({"sub": "a", "exp": int(time.time()) + 0.9})).expired
    assert fresh.connection(hs256({"sub": "a", "exp": int(time.time()) + 2.5})).user == "a"


def test_refused_tokens_are_never_remembered(monkeypatch):
    """A token that failed (bad signature, bad claims) is checked again each time, and a
    forged token carrying a remembered token's claims is still refused."""
    decodes = DecodeCounter(monkeypatch)
    v = verifier()
    good = hs256({"sub": "alice", "exp": future()})
    v.connection(good)
    header, payload, _ = good.split(".")
    forged = header + "." + payload + "." + b64(b"\0" * 32)
    bad_claims = hs256({"sub": "alice", "channels": "news"})
    for _ in range(2):
        refused(v, forged)
        refused(v, bad_claims)
    assert decodes.calls == 5  # good once, then each refusal every time


def test_the_cache_holds_at_most_cache_size_tokens(monkeypatch):
    """token.cache_size bounds what is remembered (least recently used out first); 0 turns
    remembering off."""
    decodes = DecodeCounter(monkeypatch)
    v = verifier(cache_size=2)
    a, b, c = (hs256({"sub": u, "exp": future()}) for u in "abc")
    v.connection(a)
    v.connection(b)
    v.connection(a)  # a is now the most recently used
    v.connection(c)  # b goes
    assert decodes.calls == 3
    v.connection(a)
    v.connection(c)
    assert decodes.calls == 3
    v.connection(b)
    assert decodes.calls == 4
    off = verifier(cache_size=0)
    for _ in range(3):
        off.connection(a)
    assert decodes.calls == 7
    # Tokens over MAX_CACHED_TOKEN bytes (a big meta claim) are not kept: memory stays bounded.
    big = hs256({"sub": "d", "exp": future(), "meta": {"blob": "x" * MAX_CACHED_TOKEN}})
    v.connection(big)
    v.connection(big)
    assert decodes.calls == 9
