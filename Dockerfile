# syntax=docker/dockerfile:1
#
# One image for every process of the fleet: worker, exporter, Flower, fake provider,
# demo MCP server. The entrypoint is `swarm`; the command picks the process:
#
#   docker run IMAGE worker --role research
#   docker run IMAGE flower
#   docker run --entrypoint python IMAGE -m swarm_workers.fakes.mcp_server --transport http
#
# No secrets are baked in: keys arrive at run time (env, mounted files, k8s Secrets).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtualenv with the package and its dependencies -------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README.md* : pyproject names a readme; the build only warns while it is absent.
COPY pyproject.toml README.md* ./
COPY swarm_workers ./swarm_workers
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip setuptools wheel \
 && pip install . \
 && python -c "import swarm_workers.cli"

# ---- runtime: slim, non-root, no compilers, no pip cache -------------------------
FROM ${PYTHON_IMAGE} AS runtime

# tini is PID 1: it forwards SIGTERM to `swarm` (Celery's warm shutdown) and reaps the
# zombies of stdio MCP servers. No `-g`: a process-group signal would kill tool
# subprocesses while the worker is still finishing its tasks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 swarm \
 && useradd --system --uid 10001 --gid swarm --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin swarm

COPY --from=build /opt/venv /opt/venv

# /tmp is the only place the processes write (heartbeat file, tiktoken cache); mount
# it as tmpfs / emptyDir when the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SWARM_WORKER_HEARTBEAT_FILE=/tmp/swarm-worker.heartbeat \
    TIKTOKEN_CACHE_DIR=/tmp/tiktoken

USER 10001:10001
WORKDIR /tmp

# worker metrics, exporter, Flower, fake provider, demo MCP server
EXPOSE 9808 9809 5555 8400 8500

# Exec form: no shell in between, so signals reach tini and then `swarm` directly.
ENTRYPOINT ["/usr/bin/tini", "--", "swarm"]
CMD ["--help"]
