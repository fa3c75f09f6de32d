import pytest

from tests.servers import run_in_project

# A PostgreSQL URL whose port nothing listens on. The settings are checked
# before any connection is made.
CLOSED_POSTGRES_URL = "postgres://postgres@127.0.0.1:1/proxy"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"PROXY_UPSTREAM_TIMEOUT": "abc"},
            "PROXY_UPSTREAM_TIMEOUT has an invalid value 'abc'",
            id="timeout-not-a-number",
        ),
        pytest.param(
            {"PROXY_UPSTREAM_TIMEOUT": "2m"},
            "PROXY_UPSTREAM_TIMEOUT has an invalid value '2m'",
            id="timeout-with-unit",
        ),
        pytest.param(
            {"PROXY_MAX_STREAM_SECONDS": "nan"},
            "PROXY_MAX_STREAM_SECONDS has an invalid value 'nan'",
            id="stream-limit-not-finite",
        ),
        pytest.param(
            {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL is 'LOUD'", id="unknown-log-level"
        ),
        pytest.param(
            {"PROXY_MAX_REQUEST_BYTES": "-1"},
            "PROXY_MAX_REQUEST_BYTES must be more than 0",
            id="negative-body-limit",
        ),
        pytest.param(
            {"PROXY_MAX_STREAM_SECONDS": "0"},
            "PROXY_MAX_STREAM_SECONDS must be more than 0",
            id="zero-stream-limit",
        ),
        pytest.param(
            {"PROXY_REQUEST_BODY_TIMEOUT": "99999999999"},
            "PROXY_REQUEST_BODY_TIMEOUT must be at most 3600 seconds, not 1e+11.",
            id="huge-body-timeout",
        ),
        pytest.param(
            {"PROXY_UPSTREAM_MAX_RETRIES": "-1"},
            "PROXY_UPSTREAM_MAX_RETRIES must be 0 or more, not -1",
            id="negative-retries",
        ),
        pytest.param(
            {"DEBUG": "off", "SECRET_KEY": ""}, "SECRET_KEY is not set", id="no-secret"
        ),
        pytest.param(
            {"PROXY_TRUSTED_PROXIES": "not-a-network"},
            "PROXY_TRUSTED_PROXIES contains 'not-a-network'",
            id="bad-trusted-proxy",
        ),
        pytest.param(
            {"PROXY_FAILED_AUTH_RATE": "abc"},
            "PROXY_FAILED_AUTH_RATE has an invalid value: 'abc' is not a valid rate",
            id="bad-failed-auth-rate",
        ),
        pytest.param(
            {
                "DATABASE_URL": CLOSED_POSTGRES_URL,
                "DATABASE_STATEMENT_TIMEOUT": "-1",
            },
            "DATABASE_STATEMENT_TIMEOUT must be 0 (no limit) or more seconds",
            id="negative-statement-timeout",
        ),
        pytest.param(
            {
                "DATABASE_URL": CLOSED_POSTGRES_URL,
                "DATABASE_STATEMENT_TIMEOUT": "soon",
            },
            "DATABASE_STATEMENT_TIMEOUT has an invalid value 'soon'",
            id="statement-timeout-not-a-number",
        ),
        pytest.param(
            {"DATABASE_URL": CLOSED_POSTGRES_URL, "DATABASE_CONNECT_TIMEOUT": "1.5"},
            "DATABASE_CONNECT_TIMEOUT has an invalid value '1.5': expected a whole "
            "number",
            id="connect-timeout-fraction",
        ),
        pytest.param(
            {"DATABASE_URL": CLOSED_POSTGRES_URL + "?keepalives_idle=soon"},
            "option keepalives_idle is 'soon', which",
            id="keepalive-not-a-number",
        ),
    ],
)
def test_bad_setting_stops_start_with_its_name(env, message):
    result = run_in_project(["manage.py", "check"], **env)
    assert result.returncode != 0
    assert message in result.stderr


# Loads the settings and prints how many times they read a .env file.
_COUNT_DOTENV_READS = """
import django
import environ

reads = []
environ.Env.read_env = lambda *args, **kwargs: reads.append(args)
django.setup()
print(len(reads))
"""


@pytest.mark.parametrize(
    ("module", "reads"),
    [
        pytest.param("proxy_site.settings", 1, id="proxy"),
        pytest.param("tests.settings", 0, id="test-suite"),
    ],
)
def test_only_the_proxy_reads_dotenv(module, reads):
    result = run_in_project(
        ["-c", _COUNT_DOTENV_READS],
        unset=("PROXY_READ_DOTENV",),
        DJANGO_SETTINGS_MODULE=module,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(reads)


# Loads the settings and prints the upstream timeout they read.
_PRINT_UPSTREAM_TIMEOUT = """
import django
from django.conf import settings

django.setup()
print(settings.PROXY_UPSTREAM_TIMEOUT)
"""


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("90", "90.0", id="whole"),
        pytest.param("2.5", "2.5", id="decimal"),
        pytest.param("1e3", "1000.0", id="exponent"),
    ],
)
def test_seconds_setting_reads_python_float(value, seconds):
    result = run_in_project(
        ["-c", _PRINT_UPSTREAM_TIMEOUT], PROXY_UPSTREAM_TIMEOUT=value
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == seconds
