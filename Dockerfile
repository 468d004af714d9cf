# refine-tta inference server for a GPU host (CUDA 12.8, one GPU).
#
#   docker build -t refine-tta .
#   docker build --build-arg EXTRAS='[ray]' -t refine-tta:ray .    # for several replicas (docs/ray.md)
#   docker run --gpus all -p 8000:8000 -v refine-tta-state:/var/lib/refine-tta \
#       -e REFINE_TTA_API_KEYS=key1,key2 refine-tta
#
# Another model: mount it and point REFINE_TTA_MODEL (or --model) at it, e.g.
#   -v /models/delta_net-1.3B:/models/dn:ro -e REFINE_TTA_MODEL=/models/dn
# Every setting is an environment variable REFINE_TTA_<NAME> (see server/settings.py).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Triton compiles small C launchers at run time: it needs gcc and the Python headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The CUDA build of the pinned torch first, so the project's torch==2.13.0 is already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0

WORKDIR /opt/refine-tta
COPY pyproject.toml ./
COPY refine_tta ./refine_tta
COPY server ./server
# EXTRAS='[ray]' for the Ray Serve replicas image (deploy/kuberay/rayservice.yaml, docs/ray.md).
ARG EXTRAS=""
RUN pip install ".${EXTRAS}" && python -c "import torch, refine_tta, server.app; print('torch', torch.__version__)"

# The embedded small model (config, weights, tokenizer).
COPY models ./models

RUN useradd --system --uid 10001 --home-dir /var/lib/refine-tta --shell /usr/sbin/nologin refine \
 && mkdir -p /var/lib/refine-tta/sessions \
 && chown -R refine:refine /var/lib/refine-tta

ENV REFINE_TTA_MODEL=/opt/refine-tta/models/refine-tiny-deltanet \
    REFINE_TTA_STATE_DIR=/var/lib/refine-tta/sessions \
    HF_HOME=/var/lib/refine-tta/hf \
    TRITON_CACHE_DIR=/var/lib/refine-tta/triton

VOLUME /var/lib/refine-tta
USER refine
EXPOSE 8000

# /health answers 503 while the model loads (first start compiles Triton kernels: give it time).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1

CMD ["refine-tta", "serve", "--host", "0.0.0.0", "--port", "8000", "--state-dir", "/var/lib/refine-tta/sessions"]
