# The vitalproof image used by compose.yaml's collector, worker and anchor services.

# The worker's hashing extension (native/, PyO3 + maturin), built as a wheel with Rust
# (Debian bookworm, Python 3.11: the same platform as the runtime image below).
FROM rust:1.85-slim AS native
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /native
COPY native ./
RUN python3 -m venv /venv && /venv/bin/pip install --no-cache-dir "maturin>=1.9.4,<2" \
    && /venv/bin/maturin build --release --locked --interpreter python3 -o /wheels

FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY verifier verifier
COPY vitalproof vitalproof
COPY ingest ingest
COPY streams streams
COPY anchor anchor
COPY device_sims device_sims
COPY clinic clinic
COPY --from=native /wheels /wheels
RUN pip install --no-cache-dir ./verifier . /wheels/*.whl
ENTRYPOINT ["vitalproof"]
