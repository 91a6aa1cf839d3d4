"""The ClickHouse schema: versioned SQL files in ``billing/schema``, applied once each, in order."""

from __future__ import annotations

from pathlib import Path

from billing.clickhouse import ClickHouse

SCHEMA_DIR = Path(__file__).with_name("schema")


async def apply_schema(ch: ClickHouse) -> list[str]:
    """Apply every schema file not yet recorded; return the versions applied now."""
    await ch.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version String, applied_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {row[0] for row in await ch.query("SELECT version FROM schema_migrations")}
    applied = []
    for path in sorted(SCHEMA_DIR.glob("*.sql")):
        if path.stem in done:
            continue
        for statement in _statements(path.read_text()):
            await ch.command(statement)
        await ch.insert("schema_migrations", [[path.stem]], ["version"])
        applied.append(path.stem)
    return applied


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
