"""Monitoring: the drift job (kNN density, isolated clusters, the retrain trigger), the ANN
audit (Milvus against FAISS exact), and each process's health port (`health`, over the
platform's supervised loops, platform.scheduler). May import: the platform;
never ingest, training, lifecycle, ui or cli."""
