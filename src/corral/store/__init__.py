"""Persistence: SQLAlchemy tables, the engine, Alembic migrations and query helpers."""
