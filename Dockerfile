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
# A CPU image takes torch from PyTorch's CPU index first: PyPI's Linux torch wheel pulls GBs of
# CUDA libraries a CPU worker never uses. The version is the one pyproject's cpu extra pins, so
# the install below finds it satisfied (tests/unit/test_compose.py checks this line).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ "$EXTRAS" = cpu ]; then \
      pip install --index-url "$TORCH_CPU_INDEX" \
        "$(grep -o '"torch==[^"]*"' pyproject.toml | head -n 1 | tr -d '"')"; \
    fi
RUN pip install ".[${EXTRAS}]"
RUN useradd --create-home switchboard
USER switchboard
