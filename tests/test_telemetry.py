"""Telemetry parts without a server: validation, rate limits, downsampling, config, CLI."""

from __future__ import annotations

import math
import random
import time
from fractions import Fraction

import jwt
import pytest

from server import telemetry
from server.auth import claim_globs_match
from server.config import TelemetryConfig, config_from_dict
from server.errors import ConfigError
from server.telemetry import (
    InvalidFrame,
    RateLimiter,
    frame_points,
    is_device,
    validate_frame,
    validate_point,
)
from server.telemetry_store import (
    Downsampler,
    MetricStats,
    Point,
    StepStats,
    exact_sum,
    exact_total,
    step_count,
    sum_parts,
)
from tests.helpers.process import run_cli
from tests.helpers.server import BASE_CONFIG, SECRET

NOW = 1_700_000_000_000
SKEW_MS = 300_000


def check(raw, *, now=NOW, max_metrics=64):
    return validate_point(raw, now=now, max_skew_ms=SKEW_MS, max_metrics=max_metrics)


def test_valid_point_is_normalised_to_float_values_and_int_ts():
    """A point with ints and floats comes out with float values and an integer ts."""
    point = check({"ts": NOW - 5, "values": {"temperature": 21, "signal.rssi": -60.5}})
    assert point == Point(NOW - 5, {"temperature": 21.0, "signal.rssi": -60.5})
    assert isinstance(point.values["temperature"], float)


def test_point_without_ts_gets_server_time():
    """A point without ts is stamped with the server's time."""
    assert check({"values": {"v": 1}}) == Point(NOW, {"v": 1.0})


def test_fractional_ts_is_truncated_to_milliseconds():
    """A ts like Python's time.time() * 1000 is accepted and truncated to whole ms."""
    point = check({"ts": NOW + 0.75, "values": {"v": 1}})
    assert isinstance(point, Point)
    assert point.ts == NOW


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("21.5", "not an object"),
        ([{"values": {"v": 1}}], "not an object"),
        ({"ts": NOW}, "values missing"),
        ({"values": [1, 2]}, "values must be an object"),
        ({"values": {}}, "values is empty"),
        ({"values": {"v": "hot"}}, "metric 'v' is not a number"),
        ({"values": {"v": None}}, "metric 'v' is not a number"),
        ({"values": {"v": {"x": 1}}}, "metric 'v' is not a number"),
        ({"values": {"v": True}}, "metric 'v' is a boolean, not a number"),
        ({"values": {"v": False}}, "metric 'v' is a boolean, not a number"),
        ({"values": {"v": math.nan}}, "metric 'v' is not finite"),
        ({"values": {"v": math.inf}}, "metric 'v' is not finite"),
        ({"values": {"v": -math.inf}}, "metric 'v' is not finite"),
        ({"values": {"v": 10**400}}, "metric 'v' is not finite"),  # past the float range
        ({"values": {"": 1}}, "invalid metric name ''"),
        ({"values": {"x" * 65: 1}}, "invalid metric name"),
        ({"values": {"bad name": 1}}, "invalid metric name 'bad name'"),
        ({"values": {"temp/c": 1}}, "invalid metric name 'temp/c'"),
        ({"values": {"temp\n": 1}}, "invalid metric name 'temp\\n'"),  # $ matches before \n
        ({"values": {"tëmp": 1}}, "invalid metric name"),
        ({"ts": NOW + SKEW_MS + 1, "values": {"v": 1}}, "more than 300s away from server time"),
        ({"ts": NOW - SKEW_MS - 1, "values": {"v": 1}}, "more than 300s away from server time"),
        ({"ts": "2024-01-01", "values": {"v": 1}}, "ts must be a number"),
        ({"ts": True, "values": {"v": 1}}, "ts must be a number"),
        ({"ts": math.inf, "values": {"v": 1}}, "ts must be finite"),
        ({"ts": NOW, "values": {"v": 1}, "seq": 4}, "unknown field 'seq'"),
    ],
)
def test_each_kind_of_bad_point_is_rejected_with_its_reason(raw, reason):
    """Every kind of invalid point is refused, and the reason names what is wrong."""
    result = check(raw)
    assert isinstance(result, str), result
    assert reason in result


def test_a_name_refused_stays_refused_after_valid_names_and_memory_stays_bounded():
    """Valid metric names are remembered to skip the pattern match: a bad name is still
    refused whatever came before, and a device sending ever new names does not make the
    remembered set grow without bound."""
    assert isinstance(check({"values": {"temp": 1, "hum": 2}}), Point)
    assert "invalid metric name 'temp '" in check({"values": {"temp": 1, "temp ": 2}})
    for i in range(telemetry.MAX_VALID_NAMES + 10):
        assert isinstance(check({"values": {f"m{i}": 1}}), Point)
    assert 0 < len(telemetry._valid_names) <= telemetry.MAX_VALID_NAMES
    assert "invalid metric name 'temp/c'" in check({"values": {"temp/c": 1}})


def test_metric_count_limit():
    """64 metrics pass; 65 are refused as too many."""
    ok = {f"m{i}": i for i in range(64)}
    assert isinstance(check({"values": ok}), Point)
    result = check({"values": {**ok, "one_more": 1}})
    assert result == "too many metrics (65 > 64)"


def test_metric_names_of_64_allowed_characters_pass():
    """The whole allowed alphabet, up to 64 characters, is a valid metric name."""
    name = "Az09_.-" + "x" * 57
    assert len(name) == 64
    assert isinstance(check({"values": {name: 1}}), Point)


def test_frame_keeps_valid_points_and_lists_rejected_ones_by_index():
    """Valid points of a mixed frame are accepted; invalid ones are reported by index."""
    cfg = TelemetryConfig()
    raw = [
        {"ts": NOW - 2, "values": {"v": 1}},
        {"ts": NOW - 1, "values": {"v": "x"}},
        {"ts": NOW - 2, "values": {"v": 3}},
        {"ts": NOW, "values": {"v": 4}},
    ]
    accepted, rejected = validate_frame(raw, now=NOW, cfg=cfg)
    assert [p.ts for p in accepted] == [NOW - 2, NOW]
    assert [(r.index, r.reason) for r in rejected] == [
        (1, "metric 'v' is not a number"),
        (2, f"duplicate ts {NOW - 2} in this frame"),
    ]


def test_frame_shape_limits():
    """A single point is a frame of one; an empty list and an oversized list are refused."""
    assert frame_points({"values": {}}, 3) == [{"values": {}}]
    with pytest.raises(InvalidFrame, match="no points"):
        frame_points([], 3)
    with pytest.raises(InvalidFrame, match=r"too many points in one frame \(4 > 3\)"):
        frame_points([{}] * 4, 3)


def test_device_claim_must_be_literally_true():
    """Only "device": true makes a device token (not "true", 1 or absence)."""
    assert is_device({"device": True})
    assert not is_device({"device": "true"})
    assert not is_device({"device": 1})
    assert not is_device({})


def test_claim_globs():
    """A list of glob patterns matches device ids; anything else matches nothing."""
    claims = {"devices": ["sensor-*", "pump-1"], "bad": "sensor-*"}
    assert claim_globs_match(claims, "devices", "sensor-42")
    assert claim_globs_match(claims, "devices", "pump-1")
    assert not claim_globs_match(claims, "devices", "pump-2")
    assert not claim_globs_match(claims, "devices", "Sensor-1")  # case-sensitive
    assert not claim_globs_match(claims, "bad", "sensor-1")
    assert not claim_globs_match(claims, "missing", "sensor-1")
    assert not claim_globs_match(claims, "", "sensor-1")


def test_rate_limiter_refuses_whole_requests_and_refills():
    """Tokens refill at the rate; a refused request takes nothing; over-burst never passes."""
    now = [0.0]
    limiter = RateLimiter(10.0, 5, clock=lambda: now[0])
    assert limiter.take("a", 5) == 0.0
    assert limiter.take("a", 1) == pytest.approx(0.1)
    assert limiter.take("b", 5) == 0.0  # per key
    now[0] = 0.25  # 2.5 tokens back
    assert limiter.take("a", 3) == pytest.approx(0.05)
    assert limiter.take("a", 2) == 0.0
    assert limiter.take("a", 6) == math.inf
    assert RateLimiter(0.0, 1).take("a", 10**6) == 0.0  # rate 0 = unlimited


def test_rate_limiter_forgets_least_recently_used_devices():
    """Rate state is bounded: beyond max_keys the quietest device is forgotten."""
    now = [0.0]
    limiter = RateLimiter(1.0, 1, max_keys=2, clock=lambda: now[0])
    for key in ("a", "b", "c"):
        assert limiter.take(key, 1) == 0.0
    assert limiter.take("a", 1) == 0.0  # forgotten, so full again
    assert limiter.take("c", 1) > 0


def test_downsampler_uses_whole_bucket_summaries_and_raw_points_at_the_edges():
    """Buckets inside one step contribute their summary; edge buckets their points in range."""
    ds = Downsampler(start=5, end=35, step=20, bucket_ms=10)
    assert not ds.whole(0)  # starts before the range
    assert ds.whole(10)
    assert not ds.whole(30)  # ends after the range
    ds.add_points([(4, 100.0), (5, 1.0), (9, 3.0)])  # bucket 0: ts 4 is out of range
    ds.add_stats(10, MetricStats(2.0, 6.0, exact_sum(8.0), 2))
    ds.add_stats(20, MetricStats(-1.0, 1.0, exact_sum(0.0), 2))
    ds.add_points([(30, 10.0), (35, 99.0)])  # ts 35 is out of range
    assert ds.result() == [
        StepStats(0, 1.0, 6.0, 3.0, 4),
        StepStats(20, -1.0, 10.0, 10.0 / 3, 3),
    ]


def test_downsampler_avg_is_the_exact_mean_whatever_the_order_or_the_summaries():
    """avg is the exact mean rounded once: the same for any order of the values and
    whether a bucket comes as a summary or as points (float sums differed in the last
    digits), and finite when the sum is past the float range (it was inf: JSON null)."""
    rng = random.Random(5)
    values = [round(rng.uniform(-50, 50), 1) for _ in range(300)] + [1e16, 0.3, -1e16]
    want = float(sum(map(Fraction, values)) / len(values))
    answers = set()
    for _ in range(5):
        rng.shuffle(values)
        raw = Downsampler(start=0, end=1000, step=1000, bucket_ms=100)
        raw.add_points((i, v) for i, v in enumerate(values))
        summarized = Downsampler(start=0, end=1000, step=1000, bucket_ms=100)
        for bucket in range(0, len(values), 100):
            stats = MetricStats.of(values[bucket])
            for v in values[bucket + 1 : bucket + 100]:
                stats.add(v)
            summarized.add_stats(bucket, stats)
        for ds in (raw, summarized):
            [step] = ds.result()
            answers.add(step.avg)
    assert answers == {want}
    huge = Downsampler(start=0, end=10, step=10, bucket_ms=10)
    huge.add_points([(0, 1.7e308), (1, 1.7e308), (2, -1.7e308), (3, 1.7e308)])
    assert huge.result()[0].avg == float(Fraction(1.7e308) / 2)


def test_exact_sums_survive_storage_as_float_parts():
    """exact_total matches the slow exact sum, and sum_parts stores it losslessly."""
    rng = random.Random(9)
    for values in (
        [rng.uniform(-1, 1) * 10 ** rng.randint(-300, 300) for _ in range(200)],
        [0.1] * 10,
        [1.7e308] * 3 + [5e-324],
        [],
    ):
        exact = sum(map(exact_sum, values))
        assert exact_total(values) == exact
        assert sum(map(exact_sum, sum_parts(exact))) == exact


def test_downsampler_bucket_straddling_a_step_is_not_whole():
    """A bucket crossing a step boundary must be read point by point."""
    ds = Downsampler(start=0, end=100, step=15, bucket_ms=10)
    assert ds.whole(0)
    assert not ds.whole(10)  # 10..19 crosses 15


def test_step_count():
    """Epoch-aligned steps touched by [start, end)."""
    assert step_count(0, 10, 10) == 1
    assert step_count(5, 15, 10) == 2
    assert step_count(10, 10, 10) == 0
    assert step_count(0, 3_600_000, 1000) == 3600


def test_telemetry_config_is_validated_with_the_key_named():
    """Bad telemetry settings stop start-up with the dotted key in the message."""
    with pytest.raises(ConfigError, match=r"telemetry.bucket_seconds: must be greater than 0"):
        config_from_dict({"telemetry": {"bucket_seconds": 0}})
    with pytest.raises(ConfigError, match=r"telemetry.bucket_seconds: must be whole milliseconds"):
        config_from_dict({"telemetry": {"bucket_seconds": 0.0005}})
    with pytest.raises(ConfigError, match=r"telemetry.namespace: namespace 'chat' needs"):
        config_from_dict({**BASE_CONFIG, "telemetry": {"namespace": "chat"}})
    with pytest.raises(ConfigError, match=r"namespaces.t.telemetry: telemetry is stored as"):
        config_from_dict(
            {
                "namespaces": {
                    "t": {"telemetry": True, "persist": True, "history_size": 1, "history_ttl": 1}
                }
            }
        )
    with pytest.raises(ConfigError, match=r"namespaces.t.subscribe_claim: expected a string"):
        config_from_dict({"namespaces": {"t": {"subscribe_claim": ["devices"]}}})


def decode(token: str) -> dict:
    return jwt.decode(token, SECRET, algorithms=["HS256"])


def test_token_cli_mints_device_and_dashboard_tokens(tmp_path):
    """run.py token --device / --devices put the telemetry claims into the JWT."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"token:\n  hmac_secret: {SECRET}\n", encoding="utf-8")
    device = run_cli(["--config", str(cfg), "token", "--sub", "pump-1", "--device"])
    assert device.returncode == 0, device.stderr
    claims = decode(device.stdout.strip())
    assert claims["sub"] == "pump-1"
    assert claims["device"] is True
    assert claims["exp"] > time.time()
    assert "devices" not in claims
    dash = run_cli(["--config", str(cfg), "token", "--sub", "ops", "--devices", "pump-*, sensor-?"])
    assert dash.returncode == 0, dash.stderr
    claims = decode(dash.stdout.strip())
    assert claims["devices"] == ["pump-*", "sensor-?"]
    assert "device" not in claims
