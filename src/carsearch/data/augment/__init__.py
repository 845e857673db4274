"""Query augmentation: messy, human-typed queries for each labelled image, written by an
offline generator (the default) or an LLM through Ollama, each judged by a guardrail
(rules, optionally the LLM too). May import: the platform (vocabulary, errors) and the
data loaders."""

from carsearch.data.augment.core import *  # noqa: F403 - the package's public names
from carsearch.data.augment.core import __all__  # noqa: F401
