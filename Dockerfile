# syntax=docker/dockerfile:1
# One image, two roles: `docker run IMAGE serve ...` is the gRPC server (the default command),
# `docker run IMAGE train ...` the trainer. The default pretrained policy is built into the image.

# ---------------------------------------------------------------------------------- builder
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/feedloop/bin:$PATH

# torch first, from the CPU index and in its own layer: PyPI's default Linux wheel carries
# CUDA (gigabytes this image never uses), and the layer survives source changes.
RUN python -m venv /opt/feedloop \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY proto ./proto
COPY core ./core
COPY server ./server
COPY trainer ./trainer
COPY client ./client
COPY demo ./demo
# The same pinned versions as CI tests (requirements.lock, used as constraints).
RUN pip install -c requirements.lock ".[serve,train]"

# The default policy: supervised pretraining on the shipped corpus (a few minutes on 2 cores).
RUN feedloop pretrain --data-dir /opt/feedloop-data --quiet \
    && test -f /opt/feedloop-data/default-policy/manifest.json

# ---------------------------------------------------------------------------------- runtime
FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="feedloop" \
      org.opencontainers.image.description="Serve a generative policy over gRPC and improve it online from users' feedback"

RUN groupadd --system --gid 10001 feedloop \
    && useradd --system --uid 10001 --gid feedloop --home-dir /var/lib/feedloop \
       --create-home --shell /usr/sbin/nologin feedloop

COPY --from=builder /opt/feedloop /opt/feedloop
COPY --from=builder --chown=feedloop:feedloop /opt/feedloop-data/default-policy \
     /var/lib/feedloop/default-policy

ENV PATH=/opt/feedloop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEEDLOOP_DATA_DIR=/var/lib/feedloop

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/feedloop

# gRPC, server metrics, trainer metrics
EXPOSE 50051 9464 9466

# The standard grpc.health.v1 check (open without an API key, like a load balancer's probe).
# The trainer serves no gRPC: docker-compose.yml gives it its own check on /metrics.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["feedloop"]
CMD ["serve", "--host", "0.0.0.0"]
