"""Django settings for the proxy, read once from the environment and `.env`."""

import ipaddress
import math
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured, ValidationError

from keys.validators import validate_rate
from proxy_site.database import postgres_options

BASE_DIR = Path(__file__).resolve().parent.parent


class _Env(environ.Env):
    """django-environ's reader, naming the variable when a value does not parse."""

    def get_value(
        self, var, cast=None, default=environ.Env.NOTSET, parse_default=False
    ):
        try:
            return super().get_value(
                var, cast=cast, default=default, parse_default=parse_default
            )
        except ValueError as exc:
            raw = self.ENVIRON.get(var)
            raise ImproperlyConfigured(
                f"{var} has an invalid value {raw!r}: {exc}"
            ) from exc

    def float(self, var, default=environ.Env.NOTSET):
        """Read `var` as Python's float() does, rejecting NaN and infinity.

        django-environ's own float cast (0.14) drops every character except digits,
        signs, commas and dots first, so "2m" would read as 2.0 and "1e3" as 13.0.
        """
        return self.get_value(var, cast=_parse_finite_float, default=default)

    def int(self, var, default=environ.Env.NOTSET):
        """Read `var` as a whole number, naming that form when it is not one."""
        return self.get_value(var, cast=_parse_int, default=default)


def _parse_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("expected a whole number such as 10") from None


def _parse_finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError("expected a plain number such as 30 or 2.5")
    return number


env = _Env()
# The test suite turns this off, so that a .env written for a running proxy
# cannot point the tests, which empty their Redis database, at its services.
if env.bool("PROXY_READ_DOTENV", default=True):
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it in the environment or in .env; "
            "only a DEBUG=on development server may run without one."
        )
    SECRET_KEY = "django-insecure-development-only"

ALLOWED_HOSTS = env.list(
    "ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"] if DEBUG else []
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "keys",
    "generation",
]

MIDDLEWARE = [
    "proxy_site.middleware.RequestIDMiddleware",
    "proxy_site.body_timeout.RequestBodyTimeoutMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "proxy_site.urls"
WSGI_APPLICATION = "proxy_site.wsgi.application"
ASGI_APPLICATION = "proxy_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url(
        "DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
    ),
}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # libpq waits for a new connection, and PostgreSQL runs a query, without a
    # limit by default. A database server that accepts the TCP connection but
    # does not respond, a lock held by another session, or a network partition
    # would hold requests forever. Values in DATABASE_URL's query string win.
    DATABASES["default"]["OPTIONS"] = postgres_options(
        DATABASES["default"].get("OPTIONS", {}),
        connect_timeout=env.int("DATABASE_CONNECT_TIMEOUT", default=10),
        # Seconds; the proxy's own queries take milliseconds.
        statement_timeout=env.float("DATABASE_STATEMENT_TIMEOUT", default=30.0),
        pgoptions=env.str("PGOPTIONS", default=""),
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Transactions take SQLite's write lock when they begin, and wait up to 20 s
    # for it, so concurrent quota reservations queue instead of failing with
    # "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 20}
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://proxy")}
if CACHES["default"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache":
    # Django's backend opens a connection pool per thread; see proxy_site.cache.
    CACHES["default"]["BACKEND"] = "proxy_site.cache.SharedRedisCache"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

CSRF_FAILURE_VIEW = "proxy_site.error_views.csrf_failure"

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "proxy_site.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "django-openai-proxy",
    "DESCRIPTION": "A gateway in front of OpenAI: /generate-text/ and OpenAI's "
    "own API under /v1/, with per-key tiers, limits and prompt rules.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
}

# The upstream OpenAI-compatible API. The client that calls it is created once
# per process from these values.
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="https://api.openai.com/v1")

# Seconds the proxy waits for the upstream before it responds with 504.
PROXY_UPSTREAM_TIMEOUT = env.float("PROXY_UPSTREAM_TIMEOUT", default=60.0)
# Maximum length of a streamed response, in seconds, counted from the upstream's
# response headers. PROXY_UPSTREAM_TIMEOUT bounds each read, not the whole
# stream. A stream that passes this ends with a stream_time_limit error event,
# charged for what was generated. It also bounds how long a request can keep
# its token reservation (see generation.abandoned).
PROXY_MAX_STREAM_SECONDS = env.float("PROXY_MAX_STREAM_SECONDS", default=3600.0)
# Retries the openai client makes on its own. The default of 0 leaves the
# decision to the proxy, which maps every failure to a status for the client.
PROXY_UPSTREAM_MAX_RETRIES = env.int("PROXY_UPSTREAM_MAX_RETRIES", default=0)
# Model used when neither the request nor the key's tier names one.
PROXY_DEFAULT_MODEL = env.str("PROXY_DEFAULT_MODEL", default="gpt-4o-mini")
# Largest request body, in bytes, that the API accepts; larger ones get 413.
PROXY_MAX_REQUEST_BYTES = env.int("PROXY_MAX_REQUEST_BYTES", default=1_048_576)
# Django's own body limit, checked before the API's parser reads the body.
DATA_UPLOAD_MAX_MEMORY_SIZE = PROXY_MAX_REQUEST_BYTES
# Seconds the proxy waits for the next part of a request body under gunicorn
# before it responds with 408 request_timeout (see proxy_site.body_timeout).
PROXY_REQUEST_BODY_TIMEOUT = env.float("PROXY_REQUEST_BODY_TIMEOUT", default=30.0)
# A key's "last used" time is written at most this often, in seconds, so that
# a busy key does not cost a database write on every request.
PROXY_LAST_USED_RESOLUTION = env.int("PROXY_LAST_USED_RESOLUTION", default=60)

# Largest max_tokens a request may use when its tier sets no cap; larger
# requests are lowered to it. It also bounds the tokens reserved per request.
PROXY_MAX_TOKENS_CAP = env.int("PROXY_MAX_TOKENS_CAP", default=4096)

# Rate limits. What happens when the cache that stores the counts is down:
# closed (the default) returns 503 limits_unavailable, open serves unlimited.
PROXY_LIMITS_FAIL_OPEN = env.bool("PROXY_LIMITS_FAIL_OPEN", default=False)
# Requests with a wrong API key allowed per client address, in
# django-ratelimit notation. Empty: no limit.
PROXY_FAILED_AUTH_RATE = env.str("PROXY_FAILED_AUTH_RATE", default="20/m")
if PROXY_FAILED_AUTH_RATE:
    try:
        validate_rate(PROXY_FAILED_AUTH_RATE)
    except ValidationError as _exc:
        raise ImproperlyConfigured(
            f"PROXY_FAILED_AUTH_RATE has an invalid value: {_exc.messages[0]} "
            "Leave it empty for no limit."
        ) from _exc
# Addresses or networks of reverse proxies whose X-Forwarded-For is believed.
# Empty: the client address is always the socket's peer.
PROXY_TRUSTED_PROXIES = env.list("PROXY_TRUSTED_PROXIES", default=[])
for _cidr in PROXY_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_cidr, strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(
            f"PROXY_TRUSTED_PROXIES contains {_cidr!r}, which is not an IP "
            "address or network such as 10.0.0.0/8."
        ) from _exc
RATELIMIT_USE_CACHE = "default"
# The proxy applies its own failure policy, PROXY_LIMITS_FAIL_OPEN.
RATELIMIT_FAIL_OPEN = False

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
if LOG_LEVEL not in _LOG_LEVELS:
    raise ImproperlyConfigured(
        f"LOG_LEVEL is {LOG_LEVEL!r}; use one of {', '.join(_LOG_LEVELS)}."
    )
for _name in (
    "PROXY_UPSTREAM_TIMEOUT",
    "PROXY_MAX_STREAM_SECONDS",
    "PROXY_MAX_REQUEST_BYTES",
    "PROXY_REQUEST_BODY_TIMEOUT",
    "PROXY_MAX_TOKENS_CAP",
):
    # `not > 0` also rejects NaN ("nan" parses as a float).
    if not globals()[_name] > 0:
        raise ImproperlyConfigured(
            f"{_name} must be more than 0, not {globals()[_name]}."
        )
if PROXY_UPSTREAM_MAX_RETRIES < 0:
    raise ImproperlyConfigured(
        "PROXY_UPSTREAM_MAX_RETRIES must be 0 or more, not "
        f"{PROXY_UPSTREAM_MAX_RETRIES}."
    )
# A socket timeout past about 9.2e9 s (Python's clock counts nanoseconds in 64
# bits) raises OverflowError and would fail every request with a body, so the
# limit is kept far below that.
if PROXY_REQUEST_BODY_TIMEOUT > 3600:
    raise ImproperlyConfigured(
        f"PROXY_REQUEST_BODY_TIMEOUT must be at most 3600 seconds, not "
        f"{PROXY_REQUEST_BODY_TIMEOUT:g}."
    )

# ---------------------------------------------------------------------------
# Metrics and log format.
# ---------------------------------------------------------------------------

# Format of log lines: plain (`key=value` fields after the message) or json
# (one JSON object per line, for every logger).
LOG_FORMAT = env.str("LOG_FORMAT", default="plain").lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT is {LOG_FORMAT!r}; use plain or json.")

# GET /metrics: off (404, the default), open (anyone who reaches the proxy),
# or token (requires `Authorization: Bearer <PROXY_METRICS_TOKEN>`). Setting
# only PROXY_METRICS_TOKEN selects token.
PROXY_METRICS_TOKEN = env.str("PROXY_METRICS_TOKEN", default="")
PROXY_METRICS = env.str(
    "PROXY_METRICS", default="token" if PROXY_METRICS_TOKEN else "off"
).lower()
# Shortest metrics token accepted, in characters.
_MIN_METRICS_TOKEN_LENGTH = 16
if PROXY_METRICS not in ("off", "open", "token"):
    raise ImproperlyConfigured(
        f"PROXY_METRICS is {PROXY_METRICS!r}; use off, open or token."
    )
if PROXY_METRICS == "token" and len(PROXY_METRICS_TOKEN) < _MIN_METRICS_TOKEN_LENGTH:
    raise ImproperlyConfigured(
        f"PROXY_METRICS is token, but PROXY_METRICS_TOKEN has fewer than "
        f"{_MIN_METRICS_TOKEN_LENGTH} characters. Set it to a long random value, "
        "such as the output of `python -c 'import secrets; "
        "print(secrets.token_urlsafe(32))'`."
    )
# prometheus-client reads PROMETHEUS_MULTIPROC_DIR from the environment itself
# and writes its value files there. It is checked here so that a wrong path
# stops the start with the variable's name.
_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default="")
if _MULTIPROC_DIR and not Path(_MULTIPROC_DIR).is_dir():
    raise ImproperlyConfigured(
        f"PROMETHEUS_MULTIPROC_DIR is {_MULTIPROC_DIR!r}, which is not a "
        "directory. Create it (empty) before the server starts, or unset it."
    )

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "proxy_site.middleware.RequestIDLogFilter"},
        "handled_errors": {"()": "proxy_site.middleware.HandledErrorLogFilter"},
    },
    "formatters": {
        "plain": {
            "class": "proxy_site.log_format.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
        },
        "json": {"class": "proxy_site.log_format.JSONFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["request_id"],
            "formatter": LOG_FORMAT,
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Without handlers of its own, Django's lines reach only the root's
        # handler, instead of also Django's console handler in its own format.
        "django": {"handlers": []},
        # The proxy writes its own line per request; Django's would repeat it.
        # Django's defaults stop this logger's propagation, which would leave
        # its warnings to Python's last-resort handler, unformatted.
        "django.server": {"level": "WARNING", "propagate": True},
        "django.request": {"level": "ERROR", "filters": ["handled_errors"]},
        # The HTTP client logs every upstream URL at INFO.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        "httpcore2": {"level": "WARNING"},
        # The openai client logs its retries at INFO, with no URL or key.
        "openai": {"level": "INFO"},
    },
}

if not DEBUG:
    SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)


# ---------------------------------------------------------------------------
# Production serving: static files, pooled database connections and HTTPS.
# Every value comes from the environment; docs/production.md walks through
# them, and `manage.py check --deploy` passes with the values listed there.
# ---------------------------------------------------------------------------

# WhiteNoise serves the admin's static files from STATIC_ROOT, which
# `manage.py collectstatic` fills, so no separate web server is needed. It sits
# right after SecurityMiddleware so that static responses get its headers but
# skip sessions, CSRF and the rest.
_WHITENOISE = "whitenoise.middleware.WhiteNoiseMiddleware"
if _WHITENOISE not in MIDDLEWARE:
    MIDDLEWARE.insert(
        MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,
        _WHITENOISE,
    )
# Compressed copies (gzip, and Brotli when installed) are written at
# collectstatic time. No manifest: templates render before collectstatic ran.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# DATABASE_POOL=on keeps a psycopg connection pool per worker process
# (PostgreSQL only, needs psycopg[pool]). A request takes a connection from
# the pool on its first query and returns it when the response is finished.
# Sizes are per worker process: workers times DATABASE_POOL_MAX_SIZE must stay
# below PostgreSQL's max_connections.
if env.bool("DATABASE_POOL", default=False):
    if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured(
            "DATABASE_POOL is on, but DATABASE_URL is not a PostgreSQL URL. "
            "Connection pooling needs postgres://; turn DATABASE_POOL off otherwise."
        )
    if DATABASES["default"]["CONN_MAX_AGE"] != 0:
        raise ImproperlyConfigured(
            "DATABASE_POOL is on and DATABASE_CONN_MAX_AGE is not 0. A pooled "
            "connection goes back to the pool after each request; set "
            "DATABASE_CONN_MAX_AGE=0 or turn DATABASE_POOL off."
        )
    _POOL_TIMEOUT = env.float("DATABASE_POOL_TIMEOUT", default=10.0)
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=20),
        # Seconds a request waits for a free connection before it fails.
        "timeout": _POOL_TIMEOUT,
        # psycopg_pool (3.3) retries a failed connection after delays that
        # double (1, 2, 4 ... s) until reconnect_timeout (default 300 s), and
        # starts no other connection for waiting requests meanwhile. After an
        # outage of a minute or two, requests would fail for about as long
        # again once the database is back. Giving up after one request's wait
        # lets the next waiting request start a new attempt at once.
        "reconnect_timeout": _POOL_TIMEOUT,
    }

# HTTPS. The defaults suit a server reached over plain HTTP on a private
# network. Behind a TLS-terminating proxy, set the values that
# docs/production.md lists, which `check --deploy` expects.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
# Health probes usually come over plain HTTP from inside the network; a
# redirect would make them report nothing about the proxy.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool(
    "SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False
)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
# The header by which a TLS-terminating proxy reports the scheme, such as
# X-Forwarded-Proto. Set it only when that proxy always overwrites the header.
_SSL_HEADER = env.str("SECURE_PROXY_SSL_HEADER", default="")
if _SSL_HEADER:
    SECURE_PROXY_SSL_HEADER = (
        "HTTP_" + _SSL_HEADER.upper().replace("-", "_"),
        "https",
    )
# Origins such as https://proxy.example.com whose admin form posts pass CSRF.
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
