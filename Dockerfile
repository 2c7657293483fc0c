# warmserve images.
#   CPU (default):  docker build -t warmserve:cpu .
#   GPU:            docker build --build-arg BASE=<NVIDIA PyTorch container image> --build-arg VARIANT=gpu -t warmserve:gpu .
# The GPU base is NVIDIA's NGC PyTorch container (e.g. release 26.03, Python 3.12), which carries CUDA,
# TensorRT and torch-tensorrt; there the
# TensorRT test suite runs with:  docker run --gpus all warmserve:gpu python -m pytest tests/gpu -m tensorrt
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG VARIANT=cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WARMSERVE_CACHE_DIR=/var/cache/warmserve

RUN if [ "$VARIANT" = "cpu" ]; then \
      apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/warmserve
COPY pyproject.toml README.md ./
COPY cache ./cache
COPY serve ./serve
COPY deployments ./deployments
COPY tests ./tests
RUN if [ "$VARIANT" = "gpu" ]; then pip install -e ".[s3,test]"; else pip install -e ".[s3]"; fi

VOLUME /var/cache/warmserve
EXPOSE 8000
# Ray Serve application from the config file; override with your own config.
CMD ["serve", "run", "deployments/config.yaml"]
