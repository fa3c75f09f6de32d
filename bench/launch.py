"""Start the benchmark's servers and prepare its database and tools.

Everything listens on 127.0.0.1. Tools that the project does not depend on
(LiteLLM, py-spy, gevent, uvicorn) are installed under BENCH_WORK_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from servers import HOST, Server, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
WORK = Path(os.environ.get("BENCH_WORK_DIR", "/tmp/proxy-bench"))
LITELLM_VENV = WORK / "litellm-venv"
TOOLS_VENV = WORK / "tools-venv"
# gevent and uvicorn, for the worker model comparison only.
SERVER_LIB = WORK / "server-lib"
# The last run's results, from which `python bench/report.py` renders again.
RESULTS_FILE = WORK / "results.pickle"
DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/proxy_bench"
)
CACHE_URL = os.environ.get("BENCH_CACHE_URL", "redis://127.0.0.1:6379/10")
POOL_SIZE = os.environ.get("BENCH_POOL_SIZE", "30")
WORKERS = str(os.cpu_count() or 1)
UPSTREAM_KEY = "sk-bench-upstream"
LITELLM_MASTER_KEY = "sk-litellm-bench-master-key"
# Keys issued for the proxy. The first serves every client in the main runs,
# and the rest give each client its own key in one comparison run.
KEY_COUNT = 500


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_command(command: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, text=True, **options)


def ensure_tools() -> None:
    """Install LiteLLM, py-spy and uvicorn outside the project's virtualenv."""
    WORK.mkdir(parents=True, exist_ok=True)
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        log("installing litellm[proxy] into its own virtualenv (once)")
        run_command([sys.executable, "-m", "venv", str(LITELLM_VENV)])
        pip = str(LITELLM_VENV / "bin" / "pip")
        run_command([pip, "install", "--quiet", "litellm[proxy]"])
    if not (TOOLS_VENV / "bin" / "py-spy").exists():
        log("installing py-spy (once)")
        run_command([sys.executable, "-m", "venv", str(TOOLS_VENV)])
        run_command([str(TOOLS_VENV / "bin" / "pip"), "install", "--quiet", "py-spy"])
    if not SERVER_LIB.exists():
        log("installing gevent and uvicorn for the worker comparison (once)")
        pip = str(TOOLS_VENV / "bin" / "pip")
        command = [pip, "install", "--quiet", "--target", str(SERVER_LIB)]
        run_command([*command, "gevent>=24.2", "uvicorn>=0.30"])


def proxy_env(upstream_port: int, **extra: str) -> dict[str, str]:
    """Return the production environment of docs/production.md, for the bench."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", ""),
        "DJANGO_SETTINGS_MODULE": "proxy_site.settings",
        "DEBUG": "off",
        "SECRET_KEY": "benchmark-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
        "ALLOWED_HOSTS": HOST,
        "DATABASE_URL": DATABASE_URL,
        "DATABASE_POOL": "on",
        "DATABASE_POOL_MAX_SIZE": POOL_SIZE,
        "CACHE_URL": CACHE_URL,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "OPENAI_BASE_URL": f"http://{HOST}:{upstream_port}/v1",
        "WEB_CONCURRENCY": WORKERS,
        **extra,
    }


def gunicorn_setting(env: dict[str, str], name: str) -> str:
    """Return a setting of gunicorn.conf.py as gunicorn reads it with `env`."""
    code = f"import runpy; print(runpy.run_path('gunicorn.conf.py')[{name!r}])"
    return run_command(
        [str(BIN / "python"), "-c", code], cwd=ROOT, env=env, capture_output=True
    ).stdout.strip()


def prepare_database(env: dict[str, str]) -> list[str]:
    run_command(
        [sys.executable, "scripts/check_services.py", DATABASE_URL, CACHE_URL], cwd=ROOT
    )
    import psycopg
    import redis

    admin_url = DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
    name = DATABASE_URL.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{name}"')
    redis.Redis.from_url(CACHE_URL).flushdb()
    python = str(BIN / "python")
    run_command(
        [python, "manage.py", "migrate", "--no-input", "-v0"], cwd=ROOT, env=env
    )
    output = run_command(
        [python, "bench/fixtures.py", str(KEY_COUNT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
    ).stdout
    return [line for line in output.splitlines() if line.startswith("sk-")]


def start_gunicorn(
    env: dict[str, str], name: str, **overrides: str
) -> tuple[Server, int]:
    port = free_port()
    command = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "proxy_site.wsgi"]
    server_env = {**env, "GUNICORN_BIND": f"{HOST}:{port}", **overrides}
    server = Server(
        name,
        command,
        port=port,
        ready_path="/readyz",
        env=server_env,
        cwd=ROOT,
        log_path=WORK / f"{name}.log",
    )
    return server.start(), port


def start_uvicorn(env: dict[str, str]) -> tuple[Server, int]:
    port = free_port()
    command = [
        str(BIN / "python"),
        "-m",
        "uvicorn",
        "proxy_site.asgi:application",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        WORKERS,
        "--no-access-log",
        "--timeout-keep-alive",
        "75",
    ]
    server_env = {**env, "PYTHONPATH": str(SERVER_LIB)}
    server = Server(
        "uvicorn",
        command,
        port=port,
        ready_path="/readyz",
        env=server_env,
        cwd=ROOT,
        log_path=WORK / "uvicorn.log",
    )
    return server.start(), port


def start_litellm(upstream_port: int) -> tuple[Server, int]:
    port = free_port()
    config = WORK / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        '  - model_name: "*"\n'
        "    litellm_params:\n"
        '      model: "openai/*"\n'
        f'      api_base: "http://{HOST}:{upstream_port}/v1"\n'
        f'      api_key: "{UPSTREAM_KEY}"\n'
        "general_settings:\n"
        f'  master_key: "{LITELLM_MASTER_KEY}"\n'
    )
    command = [
        str(LITELLM_VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        HOST,
        "--port",
        str(port),
        "--num_workers",
        WORKERS,
    ]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", ""),
        # Use the model cost map in the wheel, not one fetched from the network.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MODE": "PRODUCTION",
    }
    server = Server(
        "litellm",
        command,
        port=port,
        ready_path="/health/liveliness",
        env=env,
        cwd=WORK,
        log_path=WORK / "litellm.log",
    )
    return server.start(), port


def database_backends() -> list[int]:
    """Return the pids of the PostgreSQL backends serving the bench database."""
    import psycopg

    name = DATABASE_URL.rsplit("/", 1)[1]
    admin_url = DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchall()
    return [row[0] for row in rows]
