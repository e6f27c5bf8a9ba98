"""The ledger's three column types, as both backends have always spelled them:
SQLite's TEXT, REAL and INTEGER; on PostgreSQL byte-order text (COLLATE "C", so
ORDER BY on UIDs matches SQLite's), 8-byte floats and 8-byte integers."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


def TEXT() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def REAL() -> sa.types.TypeEngine[float]:
    return sa.REAL().with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")


def INTEGER() -> sa.types.TypeEngine[int]:
    return sa.INTEGER().with_variant(sa.BigInteger(), "postgresql")
