"""The error envelope, and the usage record of a request whose envelope fails."""

import pytest

from generation import usage
from generation.models import UsageRecord
from generation.usage import UsageTracker
from proxy_site.errors import RateLimitExceeded, UpstreamRateLimited, envelope_for
from tests.factories import make_key


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        pytest.param(0.2, "1", id="under-a-second"),
        pytest.param(7.0, "7", id="whole"),
        pytest.param(7.1, "8", id="fraction"),
        pytest.param(float("inf"), "1", id="infinite"),
        pytest.param(float("nan"), "1", id="not-a-number"),
    ],
)
def test_retry_after_header_is_whole_seconds(seconds, header):
    _, headers = envelope_for(UpstreamRateLimited(retry_after=seconds))
    assert headers["Retry-After"] == header


@pytest.mark.django_db
def test_failed_envelope_still_settles_record(monkeypatch):
    def fail(exc):
        raise RuntimeError("envelope failed")

    monkeypatch.setattr(usage, "error_code", fail)
    api_key, _ = make_key()
    tracker = UsageTracker(api_key=api_key, endpoint="generate-text", request_id="r1")

    with pytest.raises(RateLimitExceeded), tracker:
        raise RateLimitExceeded()

    record = UsageRecord.objects.get(api_key=api_key)
    assert record.status == "refused"
    assert record.http_status == 500
    assert record.reason == "internal_error"
    assert record.settled_at is not None
