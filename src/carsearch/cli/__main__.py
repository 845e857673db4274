"""`python -m carsearch.cli`: the same entry point as the `carsearch` command."""

from carsearch.cli import main

main()
