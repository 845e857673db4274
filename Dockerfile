# carsearch: one image for every platform process (migrations, ingest worker, search page,
# ANN audit, drift). Build: docker build -t carsearch .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
    CARSEARCH_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# torch==2.13.0 is pinned in pyproject.toml. For a smaller CPU-only image, install
# torch from PyTorch's CPU wheel index in a layer before this one. A regular (not
# editable) install: the Alembic migrations ship inside the package.
RUN pip install .

# Processes run as an unprivileged user (uid/gid 10001, the runAsUser of deploy/k8s),
# which owns /data; Kubernetes also mounts the root filesystem read-only.
RUN groupadd --system --gid 10001 carsearch \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/carsearch \
       --shell /usr/sbin/nologin carsearch \
    && mkdir -p /data && chown carsearch:carsearch /data
USER 10001:10001

VOLUME ["/data"]
EXPOSE 7860
ENTRYPOINT ["carsearch"]
CMD ["--help"]
