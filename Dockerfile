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

# The C++ compiler AOTInductor builds with: the distribution's g++, in both variants. warmserve does not take
# $CXX on trust: before its first build on a node it builds and loads a tiny package with $CXX, then with the
# system's g++, and uses the first that works. Some images point CXX at a compiler that links libstdc++
# statically; packages built with it crash when loaded next to torch. The choice is in the start report
# ("build": cxx, cxx_rejected) and in the cache key.
RUN if ! command -v g++ >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/warmserve
COPY pyproject.toml README.md ./
# The package is warmserve: warmserve/ holds links to the three folders below (installed as warmserve.cache...).
COPY warmserve ./warmserve
COPY cache ./cache
COPY serve ./serve
COPY deployments ./deployments
COPY tests ./tests
COPY examples ./examples
RUN if [ "$VARIANT" = "gpu" ]; then pip install -e ".[s3,test]"; else pip install -e ".[s3]"; fi
# Byte-compile what a replica imports. Images that set PYTHONDONTWRITEBYTECODE (NVIDIA's do) otherwise compile
# some 2,300 modules of torch and torchvision from source in every new replica: seconds of every warm start.
RUN python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" /opt/warmserve

VOLUME /var/cache/warmserve
EXPOSE 8000
# The service on the embedded config, listening beyond the container; mistakes exit with one line (non-zero).
CMD ["warmserve", "run", "--host", "0.0.0.0"]
