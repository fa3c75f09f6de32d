"""PostgreSQL connection options that bound how long a request waits on the database."""

import math
import re

from django.core.exceptions import ImproperlyConfigured

# libpq's TCP settings. They detect a peer that stopped responding (its host
# crashed, or the network is partitioned) after about a minute, where Linux's
# defaults take over two hours (7200 s idle, then 9 probes 75 s apart). An
# idle connection, including one waiting for a query's result, sends its
# first keepalive probe after keepalives_idle seconds, then one every
# keepalives_interval seconds, and fails after keepalives_count unanswered
# probes: 30 + 3 x 10 = 60 s. Data that stays unacknowledged for
# tcp_user_timeout milliseconds fails the connection too. libpq ignores
# tcp_user_timeout on systems without TCP_USER_TIMEOUT (Linux has it), and
# all of these on Unix-domain sockets.
TCP_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}
# libpq parameters whose value must be a whole number, 0 or more, and where
# each can be set.
_INTEGER_OPTIONS = {
    "connect_timeout": "DATABASE_CONNECT_TIMEOUT or DATABASE_URL's query string",
    **{name: "DATABASE_URL's query string" for name in TCP_OPTIONS},
}
_WHOLE_NUMBER = re.compile(r"[0-9]+")
# PostgreSQL accepts a setting in `options` as `-c statement_timeout=...` or
# `--statement-timeout=...`.
_STATEMENT_TIMEOUT_OPTION = re.compile(r"statement[_-]timeout", re.IGNORECASE)


def postgres_options(
    options: dict,
    *,
    connect_timeout: int,
    statement_timeout: float,
    pgoptions: str = "",
) -> dict:
    """Return the OPTIONS of a PostgreSQL database with the proxy's limits added.

    `options` (from DATABASE_URL's query string) wins over every default
    here. `statement_timeout` is in seconds, and 0 adds none, so the server's
    own setting applies. `pgoptions` is the PGOPTIONS environment variable,
    which libpq ignores once `options` is passed, so it is kept in front.
    Raises ImproperlyConfigured for a value that libpq or PostgreSQL would
    reject.
    """
    if not math.isfinite(statement_timeout) or statement_timeout < 0:
        raise ImproperlyConfigured(
            f"DATABASE_STATEMENT_TIMEOUT must be 0 (no limit) or more seconds, "
            f"not {statement_timeout}."
        )
    merged = {
        "connect_timeout": connect_timeout,
        **TCP_OPTIONS,
        **options,
    }
    for name, source in _INTEGER_OPTIONS.items():
        value = merged[name]
        if isinstance(value, bool) or not _WHOLE_NUMBER.fullmatch(str(value)):
            raise ImproperlyConfigured(
                f"The PostgreSQL connection option {name} is {value!r}, which "
                f"is not a whole number of 0 or more. Fix it in {source}."
            )

    server_options = str(merged.get("options", pgoptions))
    if statement_timeout and not _STATEMENT_TIMEOUT_OPTION.search(server_options):
        # PostgreSQL counts the timeout in milliseconds; a fraction of one
        # would round to 0, which means no limit.
        milliseconds = max(1, math.ceil(statement_timeout * 1000))
        setting = f"-c statement_timeout={milliseconds}"
        merged["options"] = f"{server_options} {setting}".strip()
    return merged
