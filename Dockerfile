# The project image: one image for every role (mlflow, ray-head, ray-worker, service).
#
#   docker build -t tp-sweep:latest .
#   docker build -t tp-sweep:gpu --build-arg TF_PACKAGE='tensorflow[and-cuda]==2.21.0' .
#
# The GPU variant needs no CUDA base image: tensorflow[and-cuda] installs the CUDA and cuDNN
# user-space libraries as wheels, and the NVIDIA container toolkit brings the driver.
# BASE_IMAGE may still be swapped for another image that provides python3.11.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

# tensorflow-cpu by default; the one dependency the GPU variant replaces.
ARG TF_PACKAGE=tensorflow-cpu==2.21.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SWEEP_DATA_DIR=/data

RUN python3.11 -m venv /opt/venv \
    && groupadd --system --gid 1000 sweep \
    && useradd --system --uid 1000 --gid sweep --create-home --home-dir /home/sweep sweep \
    && mkdir -p /data /mlflow/artifacts \
    && chown sweep:sweep /data /mlflow/artifacts

# Fashion-MNIST, real and offline: Debian's package installs its four IDX files under
# /usr/share/datasets/fashion-mnist, where tp_engine.data.fashion_mnist looks before fetching.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first (pinned in pyproject.toml), in their own layer so that code changes
# rebuild only the last steps. TensorFlow comes from TF_PACKAGE.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('tensorflow')))" >/tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "${TF_PACKAGE}" \
    && rm /tmp/requirements.txt

# The project itself (.dockerignore lets through only what the image needs). --no-deps: the
# dependencies are in place, and the GPU variant must not pull tensorflow-cpu back in.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && chmod 0755 scripts/entrypoint.sh

USER 1000:1000

# Role-specific ports: MLflow 5000, Ray dashboard / Jobs API 8265, Ray GCS 6379, API 8000.
EXPOSE 5000 6379 8000 8265

ENTRYPOINT ["/app/scripts/entrypoint.sh"]
CMD ["service"]
