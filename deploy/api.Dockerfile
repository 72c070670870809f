# The HTTP / WebSocket API image: slim Python, no GPU (it talks to the Triton nodes over gRPC, encodes H.264 with
# PyAV's bundled FFmpeg), non-root. Build from the helios-deploy checkout:
#
#   docker build -f deploy/api.Dockerfile -t registry.example.com/helios-deploy:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

COPY pyproject.toml README.md /opt/helios-deploy/
COPY helios_deploy /opt/helios-deploy/helios_deploy
COPY export /opt/helios-deploy/export
COPY runtime /opt/helios-deploy/runtime

# the CPU build of torch (the API imports the runtime's types; it runs no model with --triton)
RUN python3 -m pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" \
    && python3 -m pip install /opt/helios-deploy \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin helios \
    && mkdir -p /data \
    && chown 10001:10001 /data

USER 10001:10001
WORKDIR /data
EXPOSE 8080
ENTRYPOINT ["helios-deploy", "api"]
