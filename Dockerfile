# The update-pipeline service: one serving process, its SQLite database on the /data
# volume. See docs/deploy.md. Build (BuildKit, the default builder since Docker 23):
#
#   docker build -t update-pipeline:0.1.0 .
#
# PYTHON_IMAGE may name a digest instead, to pin the base image exactly:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: wheels of the project and of every dependency -------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (pyproject.toml names README.md as the readme).
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime: the wheels installed, nothing else ----------------------------------------
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The wheels are mounted for this step only, so they take no room in the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels update-pipeline

# A fixed uid and gid, so files on the volume (and backups) keep their owner across
# rebuilds; the database folder is the user's alone. Done before VOLUME, which would
# discard later changes to /data.
RUN groupadd --system --gid 10001 update-pipeline \
    && useradd --system --uid 10001 --gid 10001 --create-home \
        --home-dir /home/update-pipeline --shell /usr/sbin/nologin update-pipeline \
    && mkdir -p /data \
    && chown 10001:10001 /data \
    && chmod 0700 /data

ENV UPDATE_PIPELINE_DB=/data/update-pipeline.db \
    UPDATE_PIPELINE_HOST=0.0.0.0 \
    UPDATE_PIPELINE_PORT=8080 \
    UPDATE_PIPELINE_LOG_FORMAT=json

USER 10001:10001
WORKDIR /home/update-pipeline
VOLUME ["/data"]
EXPOSE 8080

# Ready means the database answers and the pipeline's tasks are alive (GET /ready).
# The standard library only (slim images have no curl), and no proxy: HTTP_PROXY set
# for GitHub must not catch a request to 127.0.0.1. A 503 or no answer exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('UPDATE_PIPELINE_PORT', '').strip() or '8080'; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + port + '/api/update-pipeline/ready', timeout=4)"]

# serve stops cleanly on SIGTERM within UPDATE_PIPELINE_SHUTDOWN_TIMEOUT (30s by
# default): give `docker run` a --stop-timeout longer than that (Docker's is 10s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["update-pipeline"]
CMD ["serve"]
