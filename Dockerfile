# syntax=docker/dockerfile:1
#
# One image for every process of the fleet: worker, exporter, Flower, fake provider,
# demo MCP server. The entrypoint is `swarm`; the command picks the process:
#
#   docker run IMAGE worker --role research
#   docker run IMAGE flower
#   docker run --entrypoint python IMAGE -m swarm_workers.fakes.mcp_server --transport http
#
# Reproducible: the base image is pinned by digest, every Python dependency comes from
# requirements.lock (versions and hashes; pip refuses anything else), the tiktoken files
# are fetched once at build and checked against tiktoken's own hashes. No secrets are
# baked in: keys arrive at run time (env, mounted files, k8s Secrets).
#
# The digest is python:3.11-slim as published on Docker Hub and recorded in public
# Dockerfiles (no registry was reachable to re-check it here). Renovate/Dependabot or
# `docker buildx imagetools inspect python:3.11-slim` keep it current.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# ---- build: a virtualenv with the locked dependencies, then the package ------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, in their own layer: a source change does not reinstall them.
# The cache mount keeps downloaded wheels between builds (so no PIP_NO_CACHE_DIR).
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r requirements.lock

# The encodings token counting uses (swarm_workers/agent/budget.py), in the image:
# workers often have no route to the internet, and an empty cache silently falls
# back to the estimate. tiktoken verifies each file's sha256 on download.
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN python -c "import tiktoken; [tiktoken.get_encoding(n) for n in ('o200k_base', 'cl100k_base')]"

# README.md* : pyproject names a readme; the build only warns while it is absent.
COPY pyproject.toml README.md* ./
COPY swarm_workers ./swarm_workers
# The build backend is in the lock too: no isolated build env, nothing unpinned.
RUN pip install --no-deps --no-build-isolation . \
 && python -c "import swarm_workers.cli"

# ---- runtime: slim, non-root, no compilers, no pip cache -------------------------
FROM ${PYTHON_IMAGE} AS runtime

# tini is PID 1: it forwards SIGTERM to `swarm` (Celery's warm shutdown) and reaps the
# zombies of stdio MCP servers. No `-g`: a process-group signal would kill tool
# subprocesses while the worker is still finishing its tasks. The Debian version comes
# with the pinned base image's snapshot of the archive.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 swarm \
 && useradd --system --uid 10001 --gid swarm --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin swarm

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tiktoken /opt/tiktoken

# /tmp is the only place the processes write (heartbeat files); mount it as tmpfs /
# emptyDir when the root filesystem is read-only. The tiktoken cache is read-only
# image content, not on /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SWARM_WORKER_HEARTBEAT_FILE=/tmp/swarm-worker.heartbeat \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken

USER 10001:10001
WORKDIR /tmp

# worker metrics, exporter, Flower, fake provider, demo MCP server
EXPOSE 9808 9809 5555 8400 8500

# Exec form: no shell in between, so signals reach tini and then `swarm` directly.
ENTRYPOINT ["/usr/bin/tini", "--", "swarm"]
CMD ["--help"]
