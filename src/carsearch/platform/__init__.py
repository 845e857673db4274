"""carsearch.platform."""
