"""Search: the service (text, image and "more like this" over the serving version), the
natural-language filters read from a query (against the platform's vehicle vocabulary,
platform.vehicles), zero-shot classification, and the served-view evaluation with its
held-out phrasings. May import: the platform's database, vectors, models, domain,
settings and telemetry."""
