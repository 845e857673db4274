"""carsearch.training."""
