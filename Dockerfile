# Dreamloom in a container. `docker build .` makes a CPU image; for NVIDIA GPUs:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t dreamloom:cuda .
# and run it with `--gpus all` (compose.yaml reserves the devices). The image runs `dreamloom` (ENTRYPOINT):
# `serve` by default (all in one), or `serve --no-worker` / `worker` for the split set-up of compose.yaml.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DREAMLOOM_DATA_DIR=/data \
    DREAMLOOM_GALLERY_HOST=0.0.0.0 \
    DREAMLOOM_GALLERY_PORT=8765

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN useradd --create-home --uid 10001 dreamloom && mkdir -p /data /models && chown dreamloom:dreamloom /data /models
WORKDIR /app

# 1. Dependencies before the source: this layer is rebuilt only when pyproject.toml changes. No test extras.
COPY pyproject.toml ./
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['postgres'] if not d.startswith('torch')))" \
    > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The source and the starter models (the registry it ships is the default one).
COPY . /tmp/src
RUN pip install --no-cache-dir --no-deps /tmp/src && rm -rf /tmp/src

USER 10001:10001
VOLUME ["/data", "/models"]
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DREAMLOOM_GALLERY_PORT', '8765'), timeout=4)"]
ENTRYPOINT ["dreamloom"]
CMD ["serve"]
