# Production image of `shim serve`: slim Python, locked dependencies (requirements.lock, hashes
# checked), no embedded PostgreSQL (DATABASE_URL is required), runs as the non-root user `shim`
# (the entrypoint gives it the /data volume, which platforms mount owned by root, then drops root).
# Build and smoke-test it: scripts/docker_smoke.sh (README "Deploying").

# Python 3.11: the version CI tests on, so every pin of the universal lock (numpy's differs by
# Python version) is the one CI ran.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/shim
COPY requirements.lock ./
RUN /opt/shim/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY shim ./shim
COPY tools ./tools
RUN /opt/shim/bin/pip install --no-deps . && /opt/shim/bin/shim --version

FROM python:3.11-slim-bookworm
ENV PATH=/opt/shim/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PORT=8080 \
    SHIM_LOG_FORMAT=json \
    SHIM_DATA_DIR=/data \
    SHIM_ASSISTANTS_DIR=/app/assistants
RUN groupadd --system --gid 10001 shim \
 && useradd --system --uid 10001 --gid shim --home-dir /app --shell /usr/sbin/nologin shim \
 && mkdir -p /data /app/assistants \
 && chown shim:shim /data
COPY --from=build /opt/shim /opt/shim
COPY deploy/entrypoint.py /usr/local/bin/shim-entrypoint
# Your exported assistants: bake them in (assistants/ here), or mount a directory over it.
COPY --chown=shim:shim assistants /app/assistants
WORKDIR /app
VOLUME ["/data"]
EXPOSE 8080
# Liveness only; readiness (draining, database, model) is GET /readyz.
HEALTHCHECK --interval=10s --timeout=2s --start-period=15s \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8080\")}/healthz', timeout=2)"
# Starts as root only to chown the volume; the entrypoint execs the command as `shim`, which
# becomes PID 1 and receives SIGTERM itself (the drain: README "Deploying").
ENTRYPOINT ["/usr/local/bin/python", "/usr/local/bin/shim-entrypoint"]
CMD ["shim", "serve", "--host", "0.0.0.0"]
