"""Alembic migrations for the service's database (shipped inside the package)."""
