"""Ingest: the stages (read, validate, keep the platform's copy, pending rows, embed,
upsert, indexed rows) and the continuous worker over the queue and the inbox. May import:
the platform (its supervised loops: platform.scheduler); never monitoring, training,
lifecycle, ui or cli."""
