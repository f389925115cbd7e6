# One image for every Switchboard service, installed from the locks in requirements/. The CPU image
# (default) installs run.txt; the GPU worker builds with --build-arg LOCK=gpu on a CUDA -devel base,
# whose nvcc exllamav2's JIT extension needs (see docker-compose.yml). Services run as
# `python -m services.<name>`; tests/unit/test_compose.py checks this file statically.
ARG BASE=python:3.11-slim
FROM ${BASE}
# run: the cpu + client extras (CPU torch); gpu: the gpu extra (PyPI's CUDA torch, exllamav2).
ARG LOCK=run
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# A CUDA base is bare Ubuntu: Python, its headers (exllamav2 compiles against them) and venv come
# from apt there. A venv, because Ubuntu's Python refuses pip installs into the system (PEP 668).
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv && \
      rm -rf /var/lib/apt/lists/*; \
    fi && \
    python3 -m venv "$VIRTUAL_ENV"
WORKDIR /app
# Dependencies first, in layers of their own: a source change rebuilds only the last layers, not
# torch. Same steps as the Makefile's install: locked pip and build backend, torch, the lock.
COPY requirements/*.txt ./requirements/
COPY tools/install-torch ./tools/
RUN pip install -r requirements/build.txt
# The CPU image takes the lock's torch pin from PyTorch's CPU index: PyPI's Linux wheel pulls GBs
# of CUDA libraries a CPU worker never uses. The GPU lock's torch is PyPI's CUDA build, as is.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ "$LOCK" = run ]; then \
      tools/install-torch python "requirements/$LOCK.txt" "$TORCH_CPU_INDEX"; \
    fi
RUN pip install -r "requirements/$LOCK.txt" && pip check
# GPU image: flash-attn turns on exllamav2's paged mode, i.e. continuous batching (without it the
# worker runs one request at a time and says so). Its setup fetches a prebuilt wheel that matches
# torch/CUDA/Python, or compiles (needs the -devel base's nvcc). Not in the lock: a build, not a
# pure dependency.
ARG FLASH_ATTN=""
RUN if [ "$LOCK" = gpu ] && [ -n "$FLASH_ATTN" ]; then \
      MAX_JOBS=4 pip install --no-build-isolation "flash-attn==$FLASH_ATTN"; \
    fi
# The project itself, without touching the locked dependencies (and built with the locked backend).
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
RUN pip install --no-deps --no-build-isolation .
# The worker's demo checkpoint goes to ./.switchboard/demo-model (services/worker/engines/select.py):
# compose mounts a named volume here, which starts as a copy of this directory, owner included.
RUN useradd --create-home switchboard && install -d -o switchboard /app/.switchboard
USER switchboard
# exllamav2 compiles its CUDA extension here on first import (minutes); compose keeps it on a
# volume so that happens once per host, not on every container start.
RUN mkdir -p /home/switchboard/.cache/torch_extensions
