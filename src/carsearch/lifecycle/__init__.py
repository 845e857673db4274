"""Model lifecycle: publishing a trained run (`publish`), promotion and rollback with
re-indexing into the new version's collection and the serving alias (`reindex`), and
reconcile (`reconcile`). May import: the platform, the ingest stages (decode, embed) and,
for publishing, training (the run it publishes); never monitoring, ui or cli."""
