"""Training: the compact SigLIP base, the pairwise sigmoid loss, training data, the
Accelerate loop, and evaluation. May import: the platform and data; never ingest,
monitoring, ui or cli."""
