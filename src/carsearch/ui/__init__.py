"""carsearch.ui."""
