# parcae-serve image. CPU (default):
#   docker build -t parcae-serve:cpu .
# GPU: a CUDA runtime base; PyPI's torch wheel brings its own CUDA libraries, the base the driver
# plumbing (Ubuntu 24.04: Python 3.12, as requires-python >= 3.11 needs):
#   docker build -t parcae-serve:gpu --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 .
# A smaller CPU image: --build-arg TORCH_INDEX_URL=<a CPU-only torch wheel index>.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS python
# Slim Python bases have Python; CUDA runtime bases do not.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS build
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: it is most of the image and changes least.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
WORKDIR /src
COPY . .
RUN pip install .

FROM python AS runtime
RUN useradd --create-home --uid 10001 parcae
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER parcae
WORKDIR /home/parcae
EXPOSE 8000
# start-period covers loading the model; /health is 503 until it is ready and while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["parcae-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
