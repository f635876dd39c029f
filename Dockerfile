# syntax=docker/dockerfile:1
# fluid in a container, two targets (see docs/scale.md). Not built in this project's development
# environment (it runs no Docker engine): the base image tags below are the intended ones, unverified.
#
#   docker build --target cuda -t fluid:cuda .
#   docker build --target tpu  -t fluid:tpu  .

# ---- GPUs: the PyTorch CUDA runtime image already holds torch (>= 2.9, which pyproject asks for),
# so pip adds only the toolkit and its other dependencies.
ARG CUDA_BASE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${CUDA_BASE} AS cuda
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/fluid
COPY pyproject.toml README.md ./
COPY fluid_cli ./fluid_cli
COPY recipes ./recipes
COPY docs ./docs
RUN pip install . && fluid --help > /dev/null
CMD ["fluid", "--help"]

# ---- TPUs: torch-xla needs the torch of its own release (the 'xla' extra pins torch 2.9.0 and
# torch-xla[tpu] 2.9.0, which brings libtpu); PJRT picks the TPU runtime.
FROM python:3.11-slim AS tpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PJRT_DEVICE=TPU
WORKDIR /opt/fluid
COPY pyproject.toml README.md ./
COPY fluid_cli ./fluid_cli
COPY recipes ./recipes
COPY docs ./docs
RUN pip install -e '.[xla]' -f https://storage.googleapis.com/libtpu-releases/index.html \
 && python -c "import torch, torch_xla; assert torch.__version__.startswith('2.9.0'), torch.__version__"
CMD ["fluid", "--help"]
