# One image for the API and the Ray nodes (head and workers run Orchestra's worker code).
# CPU build; for GPU nodes build FROM a CUDA base with the CUDA torch wheel (see deploy/README.md).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY api api
COPY service service
COPY workers workers
COPY algorithms algorithms
COPY migrations migrations
COPY examples examples
RUN pip install -e .
EXPOSE 8000 8265 6379 5000
CMD ["orchestra", "serve", "--host", "0.0.0.0", "--port", "8000"]
