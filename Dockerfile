# One image for every Switchboard service; the GPU worker builds with --build-arg EXTRAS=gpu on a
# CUDA -devel base, whose nvcc exllamav2's JIT extension needs (see docker-compose.yml). Services run as `python -m services.<name>`.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
# A CPU image takes torch from PyTorch's CPU index first: PyPI's Linux torch wheel pulls GBs of
# CUDA libraries a CPU worker never uses. The version is the one pyproject's cpu extra pins, so
# the install below finds it satisfied (tests/unit/test_compose.py checks this line).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ "$EXTRAS" = cpu ]; then \
      pip install --index-url "$TORCH_CPU_INDEX" \
        "$(grep -o '"torch==[^"]*"' pyproject.toml | head -n 1 | tr -d '"')"; \
    fi
RUN pip install ".[${EXTRAS}]"
# GPU image: flash-attn >= 2.5.7 turns on exllamav2's paged mode, i.e. continuous batching (without
# it the worker runs one request at a time and says so). Its setup fetches a prebuilt wheel that
# matches the base image's torch/CUDA/Python, or compiles (needs the -devel base's nvcc).
ARG FLASH_ATTN=""
RUN if [ "$EXTRAS" = gpu ] && [ -n "$FLASH_ATTN" ]; then \
      pip install ninja packaging && \
      MAX_JOBS=4 pip install --no-build-isolation "flash-attn==$FLASH_ATTN"; \
    fi
RUN useradd --create-home switchboard
USER switchboard
# exllamav2 compiles its CUDA extension here on first import (minutes); compose keeps it on a
# volume so that happens once per host, not on every container start.
RUN mkdir -p /home/switchboard/.cache/torch_extensions
