# The vitalproof image used by compose.yaml's collector, worker and anchor services.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY vitalproof vitalproof
COPY ingest ingest
COPY streams streams
COPY anchor anchor
COPY device_sims device_sims
RUN pip install --no-cache-dir .
ENTRYPOINT ["vitalproof"]
