# The project image: the `marn` CLI and library, Ray 2.60 (head, workers, Serve, Train, Tune), Feast (the
# feature server) and the KFP client, pinned by constraints.txt exactly as `make install` pins them.
# Every cluster pod runs it (kustomize/); components/image.py and kustomize/ name the same tag.
#
#   CPU (default; everything but the GPU workers):
#     docker build -t ghcr.io/marn-project/marn:0.1.0 .
#   GPU workers (the CUDA build of torch, same torch version):
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t ghcr.io/marn-project/marn:0.1.0-gpu .
#
# The CUDA wheels bring their own CUDA runtime; the node needs only the NVIDIA driver and device plugin.
FROM python:3.11.14-slim-bookworm

# Where torch comes from: PyPI's Linux torch wheel is a CUDA build, so the CPU image asks PyTorch's CPU
# index for the same version (2.13.0+cpu); the GPU image passes a CUDA index instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    FEAST_USAGE=False

# wget: KubeRay's readiness and liveness probes run `wget ... | grep success` inside every Ray container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash marn

WORKDIR /opt/marn

# Dependencies first, in their own layers, so a source change does not reinstall 2 GB: torch from the
# chosen index, then every other dependency through a stub of the packages (same names, empty modules).
COPY constraints.txt ./
RUN pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        torch==2.13.0
COPY pyproject.toml README.md ./
RUN mkdir marn components pipelines serve cli \
    && touch marn/__init__.py components/__init__.py pipelines/__init__.py serve/__init__.py cli/__init__.py \
    && pip install -c constraints.txt . \
    && rm -rf marn components pipelines serve cli build

# The project itself (the packages the wheel ships: marn with its configs/local.yaml, components,
# pipelines, serve, and cli, where the `marn` script is assembled).
COPY marn ./marn
COPY components ./components
COPY pipelines ./pipelines
COPY serve ./serve
COPY cli ./cli
RUN pip install -c constraints.txt --no-deps --force-reinstall . \
    && pip check \
    && rm -rf build

USER marn
WORKDIR /home/marn

# Kubernetes `command` replaces this (KubeRay runs `ray start`, the feature server runs `feast serve`).
ENTRYPOINT ["marn"]
CMD ["--help"]
