# One image for every Switchboard service; the GPU worker builds with --build-arg EXTRAS=gpu on a
# CUDA base (see docker-compose.yml). Services run as `python -m services.<name>`.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
RUN pip install ".[${EXTRAS}]"
RUN useradd --create-home switchboard
USER switchboard
