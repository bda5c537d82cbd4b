# Flowgate gateway image: `docker build -t flowgate .` then `docker run -p 8080:8080 flowgate --upstream http://app:8000`
# Build stage: install the package into a virtualenv; the runtime stage copies only that virtualenv.
# The hot-path modules are compiled to C (hatch_build.py); the compiler stays in this stage.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLOWGATE_COMPILE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/flowgate
COPY pyproject.toml README.md hatch_build.py ./
COPY gateway/ gateway/
RUN /opt/flowgate/bin/pip install --no-cache-dir . \
    && find /opt/flowgate -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="flowgate" \
      org.opencontainers.image.description="Self-hosted HTTP flow-control gateway" \
      org.opencontainers.image.licenses="MIT"
RUN useradd --system --no-log-init --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin flowgate
COPY --from=build /opt/flowgate /opt/flowgate
# In a container the proxy must listen on every interface to be reachable; the admin port stays on loopback
# (set FLOWGATE_ADMIN_HOST=0.0.0.0 together with FLOWGATE_ADMIN_TOKEN to reach it from other containers).
ENV PATH="/opt/flowgate/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLOWGATE_HOST=0.0.0.0
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLOWGATE_ADMIN_PORT', '8081'), timeout=2)"]
ENTRYPOINT ["flowgate", "serve"]
