"""The production configuration: deploy checks, gunicorn settings, pooling, static."""

import json
import os
import runpy
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.test import Client

from tests.servers import HOST, free_port, run_in_project

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONFIG = PROJECT_ROOT / "gunicorn.conf.py"
# Seconds a settings or gunicorn subprocess may take.
SUBPROCESS_TIMEOUT = 60

# The environment that docs/production.md lists, with sample values.
PRODUCTION_ENV = {
    "DEBUG": "off",
    "SECRET_KEY": "production-test-secret-key-with-more-than-fifty-characters-0123",
    "ALLOWED_HOSTS": "proxy.example.com",
    "DATABASE_URL": "postgres://proxy:secret@db.example.com:5432/proxy",
    "DATABASE_POOL": "on",
    "CACHE_URL": "redis://cache.example.com:6379/0",
    "OPENAI_API_KEY": "sk-production-test-upstream-key",
    "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
    "SECURE_SSL_REDIRECT": "on",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "on",
    "SECURE_HSTS_PRELOAD": "on",
    "CSRF_TRUSTED_ORIGINS": "https://proxy.example.com",
    "PROXY_LIMITS_FAIL_OPEN": "off",
}


def _run(command: list[str], **overrides: str) -> subprocess.CompletedProcess:
    """Run a command in the project with the production environment.

    Every variable the settings read from `.env` is given here, so a
    developer's `.env` cannot change the outcome.
    """
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", ""),
        "DJANGO_SETTINGS_MODULE": "proxy_site.settings",
        **PRODUCTION_ENV,
        **overrides,
    }
    return subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


def test_check_deploy_passes(tmp_path):
    # An empty SQLite file: the check that lists unlimited tiers reads the
    # database, and an empty one has no tiers to report. No other check
    # connects to the database or the cache.
    result = _run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite3'}",
        DATABASE_POOL="off",
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_check_deploy_warns_without_https_settings(tmp_path):
    result = _run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite3'}",
        DATABASE_POOL="off",
        SECURE_SSL_REDIRECT="off",
        SECURE_HSTS_SECONDS="0",
    )

    assert "security.W004" in result.stderr + result.stdout
    assert "security.W008" in result.stderr + result.stdout


def _database_settings(**overrides: str) -> subprocess.CompletedProcess:
    code = (
        "import django, json; django.setup(); from django.conf import settings; "
        "db = settings.DATABASES['default']; "
        "print(json.dumps({'pool': db.get('OPTIONS', {}).get('pool'), "
        "'conn_max_age': db['CONN_MAX_AGE']}))"
    )
    return _run([sys.executable, "-c", code], **overrides)


def test_pool_options_from_environment():
    result = _database_settings(DATABASE_POOL_MAX_SIZE="7", DATABASE_POOL_TIMEOUT="3")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pool"] == {
        "min_size": 2,
        "max_size": 7,
        "timeout": 3.0,
        "reconnect_timeout": 3.0,
    }


def test_pool_off_by_default():
    result = _database_settings(DATABASE_POOL="")

    assert result.returncode == 0, result.stderr
    assert '"pool": null' in result.stdout


@pytest.mark.parametrize(
    "overrides, setting",
    [
        pytest.param(
            {"DATABASE_URL": "sqlite:///pool.sqlite3"}, "DATABASE_URL", id="sqlite"
        ),
        pytest.param(
            {"DATABASE_CONN_MAX_AGE": "60"}, "DATABASE_CONN_MAX_AGE", id="persistent"
        ),
    ],
)
def test_pool_rejects_misconfiguration(overrides, setting):
    result = _database_settings(**overrides)

    assert result.returncode != 0
    assert setting in result.stderr


def test_gunicorn_config_loads():
    gunicorn = Path(sys.executable).with_name("gunicorn")

    result = _run(
        [str(gunicorn), "--check-config", "-c", str(GUNICORN_CONFIG), "proxy_site.wsgi"]
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("upstream_timeout", [1, 60, 600], ids=lambda t: f"{t}s")
def test_gunicorn_timeouts_exceed_upstream_timeout(monkeypatch, upstream_timeout):
    monkeypatch.setenv("PROXY_UPSTREAM_TIMEOUT", str(upstream_timeout))

    config = runpy.run_path(str(GUNICORN_CONFIG))

    assert config["timeout"] > upstream_timeout
    assert config["graceful_timeout"] > upstream_timeout


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GUNICORN_THREADS", "abc", "GUNICORN_THREADS must be a whole number"),
        ("WEB_CONCURRENCY", "2.5", "WEB_CONCURRENCY must be a whole number"),
        ("PROXY_UPSTREAM_TIMEOUT", "1m", "PROXY_UPSTREAM_TIMEOUT must be a plain"),
        ("PROXY_UPSTREAM_TIMEOUT", "nan", "PROXY_UPSTREAM_TIMEOUT must be a plain"),
    ],
    ids=["threads-word", "workers-fraction", "timeout-unit", "timeout-nan"],
)
def test_gunicorn_config_names_invalid_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)

    with pytest.raises(ValueError, match=message):
        runpy.run_path(str(GUNICORN_CONFIG))


# Loads the gunicorn configuration at the path given and prints two values.
_PRINT_GUNICORN_CONFIG = """
import runpy
import sys

config = runpy.run_path(sys.argv[1])
print(config["graceful_timeout"], config["bind"])
"""


def test_gunicorn_config_reads_dotenv(tmp_path):
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(GUNICORN_CONFIG.read_text())
    (tmp_path / ".env").write_text(
        "PROXY_UPSTREAM_TIMEOUT=300\nGUNICORN_BIND=127.0.0.1:9001\n"
    )

    result = run_in_project(
        ["-c", _PRINT_GUNICORN_CONFIG, str(config)],
        unset=("PROXY_READ_DOTENV", "PROXY_UPSTREAM_TIMEOUT"),
        GUNICORN_BIND="127.0.0.1:9002",
    )

    assert result.returncode == 0, result.stderr
    graceful_timeout, bind = result.stdout.split()
    assert graceful_timeout == "310"
    # As in the proxy's settings, the environment wins over .env.
    assert bind == "127.0.0.1:9002"


# Loads the gunicorn configuration twice, as a reload (SIGHUP) does, with
# .env edited in between. Prints the bind of each load, then the
# PROXY_MAX_REQUEST_BYTES that workers forked afterwards would inherit.
_RELOAD_GUNICORN_CONFIG = """
import os
import runpy
import sys
from pathlib import Path

config_path = Path(sys.argv[1])
dotenv = config_path.parent / ".env"
dotenv.write_text("GUNICORN_BIND=127.0.0.1:9001\\nPROXY_MAX_REQUEST_BYTES=100\\n")
first = runpy.run_path(str(config_path))
dotenv.write_text("GUNICORN_BIND=127.0.0.1:9002\\n")
second = runpy.run_path(str(config_path))
print(first["bind"], second["bind"], os.environ.get("PROXY_MAX_REQUEST_BYTES"))
"""


def test_gunicorn_reload_reads_edited_dotenv(tmp_path):
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(GUNICORN_CONFIG.read_text())

    result = run_in_project(
        ["-c", _RELOAD_GUNICORN_CONFIG, str(config)],
        unset=("PROXY_READ_DOTENV", "GUNICORN_BIND", "PROXY_MAX_REQUEST_BYTES"),
    )

    assert result.returncode == 0, result.stderr
    first_bind, second_bind, inherited_limit = result.stdout.split()
    assert first_bind == "127.0.0.1:9001"
    assert second_bind == "127.0.0.1:9002"
    # Workers read .env themselves. A value copied into the master's
    # environment would win over .env in every later worker.
    assert inherited_limit == "None"


def test_gunicorn_serves_many_requests_per_worker(monkeypatch):
    for name in ("GUNICORN_WORKER_CLASS", "GUNICORN_THREADS"):
        monkeypatch.delenv(name, raising=False)

    config = runpy.run_path(str(GUNICORN_CONFIG))

    assert config["worker_class"] == "gthread"
    assert config["threads"] >= 250
    assert config["worker_connections"] >= config["threads"]


def test_whitenoise_follows_security_middleware():
    middleware = django_settings.MIDDLEWARE
    security = middleware.index("django.middleware.security.SecurityMiddleware")

    assert middleware[security + 1] == "whitenoise.middleware.WhiteNoiseMiddleware"


def test_admin_static_served_after_collectstatic(settings, tmp_path):
    settings.STATIC_ROOT = tmp_path
    call_command("collectstatic", interactive=False, verbosity=0)

    # A new client builds its middleware now, so WhiteNoise indexes the new files.
    response = Client().get("/static/admin/css/base.css")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css")


@pytest.fixture
def postgres_address() -> tuple[str, int]:
    """Return the test database server's host and port, or skip without one."""
    database = django_settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.postgresql":
        return database["HOST"] or HOST, int(database["PORT"] or 5432)
    reason = f"Needs PostgreSQL, but the settings use {database['ENGINE']}."
    if os.environ.get("PROXY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} PROXY_REQUIRE_SERVICES=1 forbids skipping.")
    pytest.skip(reason)


class _Relay(socketserver.ThreadingTCPServer):
    """Forward every connection on a loopback port to `target`, both ways."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.target = target
        super().__init__((HOST, port), _RelayHandler)


class _RelayHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with socket.create_connection(self.server.target) as upstream:
            pump = threading.Thread(
                target=_pump, args=(upstream, self.request), daemon=True
            )
            pump.start()
            _pump(self.request, upstream)
            pump.join()


def _pump(source: socket.socket, destination: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            destination.sendall(data)
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# Seconds the database stays unreachable. With psycopg_pool's default
# reconnect_timeout, its retry delays (1, 2, 4 s) put the next connection
# attempt at about 7 s, well after the database is back.
OUTAGE_SECONDS = 4.0


def test_pool_reconnects_soon_after_outage(transactional_db, postgres_address):
    from psycopg_pool import ConnectionPool, PoolTimeout

    result = _database_settings(DATABASE_POOL_TIMEOUT="0.5")
    assert result.returncode == 0, result.stderr
    options = json.loads(result.stdout)["pool"]
    port = free_port()
    database = django_settings.DATABASES["default"]
    pool = ConnectionPool(
        kwargs={
            "host": HOST,
            "port": port,
            "dbname": database["NAME"],
            "user": database["USER"],
            "password": database["PASSWORD"],
        },
        open=False,
        **options,
    )
    pool.open(wait=False)
    relay = None
    try:
        # Nothing listens on the port: every request waits and fails.
        deadline = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:
            with pytest.raises(PoolTimeout):
                pool.getconn()
        relay = _Relay(port, postgres_address)
        threading.Thread(target=relay.serve_forever, daemon=True).start()

        connection = pool.getconn()

        pool.putconn(connection)
    finally:
        pool.close()
        if relay is not None:
            relay.shutdown()
            relay.server_close()


# Loads the gunicorn configuration and prints reuse_port.
_PRINT_REUSE_PORT = """
import runpy
print(runpy.run_path("gunicorn.conf.py")["reuse_port"])
"""


@pytest.mark.parametrize(
    ("bind", "setting", "expected"),
    [
        ("127.0.0.1:8000", None, "True"),
        ("127.0.0.1:8000", "off", "False"),
        ("unix:/run/proxy.sock", None, "False"),
        ("127.0.0.1:0", None, "False"),
    ],
)
def test_gunicorn_reuse_port_setting(bind, setting, expected):
    overrides = {"GUNICORN_BIND": bind}
    unset = ()
    if setting is None:
        unset = ("GUNICORN_REUSE_PORT",)
    else:
        overrides["GUNICORN_REUSE_PORT"] = setting

    result = run_in_project(
        ["-c", _PRINT_REUSE_PORT], unset=unset, PROXY_READ_DOTENV="off", **overrides
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def _listening_sockets(port: int) -> int:
    """Count the IPv4 sockets in LISTEN state on `port`, from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "0A":
            count += 1
    return count


def _gunicorn_environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.sqlite3'}",
        "CACHE_URL": "locmemcache://",
        "PROXY_READ_DOTENV": "off",
        "GUNICORN_THREADS": "2",
        "WEB_CONCURRENCY": "2",
        **overrides,
    }
    environment.pop("GUNICORN_REUSE_PORT", None)
    return environment


def _start_gunicorn(
    environment: dict[str, str], *options: str, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen:
    """Start gunicorn with gunicorn.conf.py; its standard output is discarded."""
    gunicorn = Path(sys.executable).with_name("gunicorn")
    return subprocess.Popen(
        [str(gunicorn), "-c", str(GUNICORN_CONFIG), *options, "proxy_site.wsgi"],
        cwd=PROJECT_ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def test_gunicorn_workers_listen_on_own_sockets(tmp_path):
    port = free_port()
    environment = _gunicorn_environment(tmp_path, GUNICORN_BIND=f"{HOST}:{port}")
    process = _start_gunicorn(environment)
    try:
        # Two workers of a small app listen within seconds.
        deadline = time.monotonic() + 20
        while _listening_sockets(port) < 2:
            assert process.poll() is None, "gunicorn exited at start-up."
            assert time.monotonic() < deadline, "The workers did not listen."
            time.sleep(0.2)
        # The kernel splits connections only between sockets of one group,
        # so each worker has its own socket and none is left over.
        assert _listening_sockets(port) == 2
    finally:
        process.terminate()
        process.wait(timeout=SUBPROCESS_TIMEOUT)


def test_gunicorn_exits_when_port_is_taken(tmp_path):
    # A plain listening socket, as another program would hold the port.
    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        environment = _gunicorn_environment(tmp_path, GUNICORN_BIND=f"{HOST}:{port}")
        process = _start_gunicorn(environment, stderr=subprocess.PIPE)
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.communicate(timeout=SUBPROCESS_TIMEOUT)
            pytest.fail("gunicorn kept running with its port held by another socket.")

    assert process.returncode == 1
    assert f"Cannot listen on {HOST} port {port}" in stderr


def test_gunicorn_serves_unix_socket_from_command_line(tmp_path):
    path = tmp_path / "proxy.sock"
    environment = _gunicorn_environment(tmp_path)
    environment.pop("GUNICORN_BIND", None)
    process = _start_gunicorn(environment, "--bind", f"unix:{path}")
    try:
        # Two workers of a small app respond within seconds.
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "gunicorn exited at start-up."
            assert time.monotonic() < deadline, "Nothing answered on the socket."
            try:
                with socket.socket(socket.AF_UNIX) as client:
                    client.settimeout(5)
                    client.connect(str(path))
                    client.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    reply = client.recv(4096)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.2)

        assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200")
    finally:
        process.terminate()
        process.wait(timeout=SUBPROCESS_TIMEOUT)
