"""Monitoring: the drift job (kNN density, isolated clusters, the retrain trigger), the ANN
audit (Milvus against FAISS exact), the scheduler every long-running loop runs on
(`scheduler`), and each process's health port (`health`). May import: the platform;
never ingest, training, lifecycle, ui or cli."""
