"""Vectors: the store boundary (`protocol`: the VectorStore Protocol every caller is typed
against, and VectorAdmin, Milvus's administration for lifecycle and operations code), the
filter model (`filters`: typed filters and their quoted Milvus expression), the Milvus
adapter (`milvus`: a Lite file or a server), the exact in-memory mirror of a Lite
collection (`mirror`), an in-memory store (`memory`: the Protocols' second
implementation), the FAISS exact index (`exact`), and a local Milvus server on free
ports (`server`). May import: the platform's settings, errors and ids; pymilvus, FAISS,
NumPy."""
