"""Data: the Stanford Cars loader, the rendered vehicle catalogue, and query augmentation
(`augment`: offline rules, Ollama, the guardrail judge). May import: the platform (images,
the vehicle vocabulary `platform.vehicles`, errors); Pillow, SciPy, the ollama client.
Never ingest, training, lifecycle, monitoring, ui or cli."""
