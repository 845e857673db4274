"""carsearch.ingest."""
