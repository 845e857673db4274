"""The shared core every carsearch process uses.

Owns: settings, errors, ids and safe image decoding; the image collections and their
kinds (`collections`); the metadata database (`db`: tables, sessions, migrations, the
queries of each table); vectors (`vectors`: the store Protocols (data path and
administration), the filter model, the Milvus adapter, the exact in-memory mirror, the
FAISS exact index, a local Milvus server); models (`models`: the SigLIP encoder and the
registry of versions); the domain (`vehicles`: makes, models, bodies, colours, years and
how a class name reads); search (`search`: the service, natural-language filters);
retrieval metrics; the supervised loops and background jobs every long-running process
runs its work on (`scheduler`); thumbnails of indexed images (`thumbnails`); telemetry
(Prometheus counters); trusted artifacts (`artifacts`: the sha256 the database recorded
for each file of an exact index or training checkpoint, checked before loading); and
`runtime`, which wires them for one process (`Platform.store`, the data path;
`Platform.admin`, the store's administration for lifecycle and operations code).
May import: third-party libraries only. Nothing in the platform imports data, training,
lifecycle, monitoring, ingest, ui or cli.
"""
