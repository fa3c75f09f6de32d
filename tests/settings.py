"""Settings for the test suite: the project's settings with test credentials.

DATABASE_URL and CACHE_URL still come from the environment (not from .env), so
the same suite runs on SQLite and local memory, or on PostgreSQL and Redis.
"""

import os

# Settings come from the environment only, never from a developer's .env,
# which may name the services of a running proxy. Servers that tests start
# inherit this.
os.environ.setdefault("PROXY_READ_DOTENV", "off")
os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")

from proxy_site.settings import *  # noqa: E402,F403

# The fake upstream checks that it receives exactly this key.
OPENAI_API_KEY = "sk-upstream-secret-for-tests-0123456789"
# Replaced per test by the fake upstream's address. Server processes that tests
# start read it from PROXY_TEST_UPSTREAM_URL.
OPENAI_BASE_URL = os.environ.get("PROXY_TEST_UPSTREAM_URL", "http://127.0.0.1:9/v1")
PROXY_UPSTREAM_TIMEOUT = 2.0
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
