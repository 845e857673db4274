"""Search: the service (text, image and "more like this" over the serving version), the
natural-language filters read from a query, the label vocabulary every part shares
(makes, bodies, colours, years), and the served-view evaluation with its held-out
phrasings. May import: the platform's database, vectors, models,
settings and telemetry."""
