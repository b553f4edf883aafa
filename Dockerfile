# One image for the API and the Ray nodes (head and workers run Orchestra's worker code), so it
# installs the wheel with the cluster extra. CPU build; for GPU nodes build FROM a CUDA base with
# the CUDA torch wheel. An API-only image needs just the core: `pip install /dist/orchestra-*.whl`
# (no torch; README.md, "Installing").

# The wheel, built from the sources alone (the Alembic migrations ride inside service/).
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY api api
COPY service service
COPY workers workers
COPY algorithms algorithms
RUN pip wheel --no-deps -w /dist .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch first, pinned, from the CPU index: the cluster extra's torch==2.13.0 is then satisfied
# (an unpinned resolution would pull a multi-GB CUDA build).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=wheel /dist /dist
RUN pip install "$(ls /dist/orchestra-*.whl)[cluster]" && rm -rf /dist
COPY examples examples
EXPOSE 8000 8265 6379 5000
CMD ["orchestra", "serve", "--host", "0.0.0.0", "--port", "8000"]
