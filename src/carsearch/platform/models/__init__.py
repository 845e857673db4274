"""Models: the SigLIP encoder (load once, encode text and images) and the registry of
published versions (artifacts, hashes, which one serves). May import: the platform's
database, errors and settings; torch and transformers (inside the encoder only)."""
