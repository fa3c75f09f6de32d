"""Gunicorn settings for serving the proxy in production.

Start it with `make serve`, which runs
`.venv/bin/gunicorn -c gunicorn.conf.py proxy_site.wsgi`. Each value can be
changed by the environment variable named beside it; docs/production.md
explains them and docs/benchmarks.md shows how the defaults were chosen.
"""

import math
import os
import socket
import sys
from pathlib import Path

import environ
from gunicorn.util import is_ipv6


class _DotEnv(environ.Env):
    """The variables of .env, kept apart from os.environ."""

    ENVIRON: dict[str, str] = {}


# The proxy's settings read .env in each worker, after gunicorn has read this
# file. Read it here too, so that the GUNICORN_* variables and
# PROXY_UPSTREAM_TIMEOUT in .env apply to gunicorn. The environment wins, as
# it does in the settings. The values stay out of os.environ: workers inherit
# the master's environment, which wins over .env, so an edit of .env would
# not reach the workers that a reload (SIGHUP) starts.
if environ.Env().bool("PROXY_READ_DOTENV", default=True):
    _DotEnv.read_env(Path(__file__).resolve().parent / ".env")
_variables = environ.Env()
_variables.ENVIRON = {**_DotEnv.ENVIRON, **os.environ}


def _int(name: str, default: int) -> int:
    raw = _variables.ENVIRON.get(name) or ""
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}.") from None


def _float(name: str, default: float) -> float:
    raw = _variables.ENVIRON.get(name) or ""
    if not raw:
        return default
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(
            f"{name} must be a plain number such as 30 or 2.5, not {raw!r}."
        )
    return number


bind = _variables.ENVIRON.get("GUNICORN_BIND", "127.0.0.1:8000")
# Each worker listens on its own socket with SO_REUSEPORT, so the kernel
# assigns new connections to the workers by a hash of their addresses. With
# one shared socket, whichever worker was free first accepted them. In the
# benchmark one worker of two took 399 of 500 keep-alive connections, more
# than its threads, so calls queued behind others. A Unix socket path cannot be shared
# this way, and with port 0 each worker would get a different port.
reuse_port = _variables.bool("GUNICORN_REUSE_PORT", default=True) and not (
    bind.startswith("unix:") or bind.endswith(":0")
)

# gthread runs each request in a thread of a pool, so a worker serves
# `threads` upstream calls at once, because a thread that waits on a socket
# releases the GIL. docs/benchmarks.md compares it with gevent and uvicorn.
worker_class = _variables.ENVIRON.get("GUNICORN_WORKER_CLASS", "gthread")
# One process per core: the proxy's own work is CPU-bound Python.
workers = _int("WEB_CONCURRENCY", os.cpu_count() or 1)
# Requests each worker serves at once. A request gives its pooled database
# connection back while it waits for the upstream, so the pool size does not
# cap this. SO_REUSEPORT splits connections by a hash, not exactly evenly:
# 500 connections over two workers give one of them more than 256 about half
# the time, and more than 320 almost never (a binomial estimate). A thread
# costs memory only once it has served a request.
threads = _int("GUNICORN_THREADS", 320)
# Client connections (most of them idle keep-alives) each worker keeps open.
worker_connections = _int("GUNICORN_WORKER_CONNECTIONS", 1000)

# A generation may wait PROXY_UPSTREAM_TIMEOUT seconds for the upstream, and a
# stream may pause that long between events. A worker that stays silent for
# `timeout` seconds is killed, so it must be longer. Stopping (SIGTERM) waits
# as long for requests in flight, so that their usage records are settled.
_upstream_timeout = _float("PROXY_UPSTREAM_TIMEOUT", 60.0)
timeout = int(_upstream_timeout) + 30
graceful_timeout = int(_upstream_timeout) + 10
# Seconds an idle keep-alive connection stays open. A load balancer in front
# should close idle connections first, so set its idle timeout lower than this.
keepalive = _int("GUNICORN_KEEPALIVE", 75)

# The proxy writes one access line per request itself, with the request id.
accesslog = None
errorlog = "-"
loglevel = _variables.ENVIRON.get("GUNICORN_LOG_LEVEL", "info")
# Pending connections the kernel queues before the workers accept them.
backlog = _int("GUNICORN_BACKLOG", 2048)


def on_starting(server) -> None:
    """Check the final bind addresses before the workers open their sockets."""
    _check_reuse_port(server)


def on_reload(server) -> None:
    """Check the bind addresses again, because SIGHUP reads this file again."""
    _check_reuse_port(server)


def _check_reuse_port(server) -> None:
    """Turn reuse_port off where it cannot work, and exit on a port in use.

    The bind can also come from --bind or GUNICORN_CMD_ARGS, which the check
    of GUNICORN_BIND above does not see. With reuse_port the workers open
    their sockets themselves. A worker that cannot bind exits and gunicorn
    starts another, forever, so a port held by another program or a Unix
    socket (where SO_REUSEPORT fails) left a server that served nothing.
    """
    config = server.cfg
    if not config.reuse_port:
        return
    addresses = config.address
    if any(not isinstance(address, tuple) or address[1] == 0 for address in addresses):
        server.log.info(
            "Sharing one listening socket: the bind is not a fixed TCP port."
        )
        config.set("reuse_port", False)
        return
    for host, port in addresses:
        _exit_unless_bindable(server, host, port)
    # gunicorn's own start-up line shows no address when the workers bind.
    server.log.info(
        "Each worker listens on its own socket (SO_REUSEPORT) at %s.",
        ", ".join(f"{host}:{port}" for host, port in addresses),
    )


def _exit_unless_bindable(server, host: str, port: int) -> None:
    """Bind a throwaway socket to the address as the workers will, or exit 1."""
    family = socket.AF_INET6 if is_ipv6(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            server.log.error(
                "Cannot listen on %s port %s: %s. Stop the program that uses "
                "the port, or set GUNICORN_BIND to a free one.",
                host,
                port,
                exc.strerror or exc,
            )
            sys.exit(1)


# gunicorn's control socket has one path per user, so a second instance on the
# same host would take it over. The proxy does not use it.
control_socket_disable = True
