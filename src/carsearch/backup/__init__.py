"""Backups and restores of a whole deployment (`carsearch backup create|verify|restore`).

Owns: the backup folder's layout and manifest (`manifest`), the portable export and import
of every database table through SQLAlchemy (`tables`), taking a backup (`create`) and
restoring one into empty targets of either shape, Milvus Lite + SQLite or a Milvus server
+ PostgreSQL (`restore`). May import: the platform only; nothing imports it but the CLI.
"""
