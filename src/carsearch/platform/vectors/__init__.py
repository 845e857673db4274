"""Vectors: the store Protocol every caller is typed against, its Milvus adapter (a Lite
file or a server), the exact in-memory mirror of a Lite collection, an in-memory store
(`memory`: the Protocol's second implementation), the FAISS exact index, and a local
Milvus server on free ports (`server`). May import: the platform's settings, errors and
ids; pymilvus, FAISS, NumPy."""
