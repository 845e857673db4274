"""carsearch: natural-language vehicle image retrieval.

The parts, each a package that says what it owns and may import: `platform` (the shared
core), `data`, `training`, `lifecycle`, `monitoring`, `ingest`, `ui`, and `cli`, the one
entry point; `migrations` ships the Alembic environment. Importing this package imports
nothing else.
"""
