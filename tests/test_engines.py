"""``server.engines``: engine selection helpers that need no running service."""

from __future__ import annotations

import pytest

from server.engines import redact


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "mongodb://u:p@h1:27017,h2:27018/db?replicaSet=rs0",
            "mongodb://u:***@h1:27017,h2:27018/db?replicaSet=rs0",
        ),
        (
            "mongodb+srv://app:s3cret@cluster.example.com/db",
            "mongodb+srv://app:***@cluster.example.com/db",
        ),
        ("mongodb://u:p%40ss%2Fw@h:27017/db", "mongodb://u:***@h:27017/db"),
        ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:pw@[::1]:6379/0", "redis://user:***@[::1]:6379/0"),
        # redis-py's query form, the usual one for unix sockets
        (
            "unix:///run/redis.sock?db=2&password=s3cr%3Aet",
            "unix:///run/redis.sock?db=2&password=***",
        ),
        ("redis://127.0.0.1:6379/0?password=p&db=7", "redis://127.0.0.1:6379/0?password=***&db=7"),
        # An unescaped '@' in the password: redis-py reads the password up to the last
        # '@' (here "R3dis@Secret"), so all of it is hidden, not just up to the first.
        ("redis://:R3dis@Secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("mongodb://u:a@b@h:27017/db?authSource=x@y", "mongodb://u:***@h:27017/db?authSource=x@y"),
        ("redis://u@x:pw@h:6379/0", "redis://u@x:***@h:6379/0"),
    ],
)
def test_redact_hides_the_password_in_single_and_multi_host_urls(url: str, expected: str) -> None:
    """Logged engine URLs keep user, hosts, path and options but never the password."""
    assert redact(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://127.0.0.1:27017/",
        "mongodb://h1:27017,h2:27018/db?authSource=a@b",
        "mongodb://user@h1/db",
        "redis://127.0.0.1:6379/0",
        "not a url",
    ],
)
def test_redact_leaves_urls_without_a_password_alone(url: str) -> None:
    """A URL without a password is logged as it is (and redact never raises)."""
    assert redact(url) == url
