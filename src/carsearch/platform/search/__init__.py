"""Search: the service (text, image and "more like this" over the serving version), the
natural-language filters read from a query, and the label vocabulary every part shares
(makes, bodies, colours, years). May import: the platform's database, vectors, models,
settings and telemetry."""
