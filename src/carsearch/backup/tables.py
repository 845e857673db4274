"""Every database table out to JSON lines and back in, through SQLAlchemy, on either dialect.

The export reads tables reflected from the source (so a table or column a newer migration
added is carried without a change here), in one snapshot: a read-only REPEATABLE READ
transaction on PostgreSQL, the online-backup copy of the file on SQLite. Values are plain
JSON; timestamps are written in UTC ISO form and turned back into datetimes by the
target column's type on import. The import inserts rows in foreign-key order into tables
reflected from the target (which the Alembic migrations made), then moves PostgreSQL's
sequences past the highest id inserted, so that new rows do not collide with restored ones.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from carsearch.backup.manifest import BackupError

log = logging.getLogger(__name__)

ALEMBIC = "alembic_version"
# The state of the processes that wrote the backup (who holds a lease, what their loops
# were doing): kept in the backup, not restored, so that a restored deployment's processes
# neither wait for a dead holder's lease nor show its loops.
PROCESS_STATE = frozenset({"leases", "loop_status"})
Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        ts = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return ts.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return value


def reflect(conn: Connection) -> sa.MetaData:
    meta = sa.MetaData()
    meta.reflect(conn)
    return meta


def export_tables(conn: Connection, out: Path, *, batch: int = 5000) -> dict[str, int]:
    """Write every table but alembic_version to ``out/<table>.jsonl``; rows per table."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for table in reflect(conn).sorted_tables:
        if table.name == ALEMBIC:
            continue
        pk = list(table.primary_key.columns) or list(table.columns)
        n = 0
        with (out / f"{table.name}.jsonl").open("w") as fh:
            result = conn.execution_options(yield_per=batch).execute(
                sa.select(table).order_by(*pk))
            for row in result.mappings():
                fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()},
                                    separators=(",", ":")) + "\n")
                n += 1
        counts[table.name] = n
    return counts


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _converter(column: sa.Column[Any]) -> Callable[[Any], Any]:
    kind = column.type
    if isinstance(kind, sa.DateTime):
        def to_datetime(v: Any) -> Any:
            if not isinstance(v, str):
                return v
            ts = datetime.fromisoformat(v)
            return ts if kind.timezone or ts.tzinfo is None else ts.astimezone(UTC)
        return to_datetime
    if isinstance(kind, sa.Date):
        return lambda v: date.fromisoformat(v) if isinstance(v, str) else v
    if isinstance(kind, sa.LargeBinary):
        return lambda v: base64.b64decode(v) if isinstance(v, str) else v
    if isinstance(kind, sa.JSON):
        return lambda v: sa.null() if v is None else v  # SQL NULL, not JSON 'null'
    return lambda v: v


def clear_tables(conn: Connection) -> None:
    """Delete every row of every table but alembic_version, dependants first."""
    for table in reversed(reflect(conn).sorted_tables):
        if table.name != ALEMBIC:
            conn.execute(table.delete())


def import_tables(conn: Connection, src: Path, counts: dict[str, int], *,
                  rewrite: dict[str, Rewrite] | None = None, batch: int = 2000) -> None:
    """Insert the rows of ``src/<table>.jsonl`` into the (emptied) target tables, parents
    first; every table of the backup must exist in the target with every column."""
    meta = reflect(conn)
    missing = sorted(set(counts) - set(meta.tables))
    if missing:
        raise BackupError(f"the target database has no table {', '.join(missing)}")
    rewrite = rewrite or {}
    for table in meta.sorted_tables:
        if table.name not in counts or table.name in PROCESS_STATE:
            continue
        convert = {c.name: _converter(c) for c in table.columns}
        fix = rewrite.get(table.name)
        rows: list[dict[str, Any]] = []
        for raw in read_rows(src / f"{table.name}.jsonl"):
            unknown = set(raw) - set(convert)
            if unknown:
                raise BackupError(f"the target's table {table.name} has no column "
                                  f"{', '.join(sorted(unknown))}")
            row = fix(raw) if fix else raw
            rows.append({k: convert[k](v) for k, v in row.items()})
            if len(rows) >= batch:
                conn.execute(table.insert(), rows)
                rows = []
        if rows:
            conn.execute(table.insert(), rows)
    if conn.dialect.name == "postgresql":
        _advance_sequences(conn, meta)


def _advance_sequences(conn: Connection, meta: sa.MetaData) -> None:
    """setval every serial/identity sequence to its column's highest value."""
    for table in meta.sorted_tables:
        for column in table.primary_key.columns:
            seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"),
                               {"t": table.name, "c": column.name}).scalar()
            if seq is None:
                continue
            top = conn.execute(sa.select(sa.func.max(column))).scalar()
            conn.execute(sa.text("SELECT setval(:s, :v, :called)"),
                         {"s": seq, "v": int(top) if top is not None else 1,
                          "called": top is not None})
