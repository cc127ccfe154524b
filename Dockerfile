# The gateway as one small image: `python gateway.py` as a non-root user, its state on a volume.
#   docker build -t mesh-gateway .
#   docker run -p 4000:4000 -v mesh-data:/data mesh-gateway
# Every setting is an environment variable (README.md, "Configuration").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
# (Every runtime dependency ships manylinux wheels: no compiler in the image.)
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# A fixed uid/gid, so a host directory bind-mounted at /data can be given to it (chown 10001:10001).
# A new named volume copies /data from the image, ownership included.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /app --shell /usr/sbin/nologin gateway \
 && mkdir /data \
 && chown gateway:gateway /data

COPY gateway.py gateway_redis.py ./

# State: the SQLite database (registry + offline mailboxes) lives on the volume; a Node gateway's
# registry.json dropped into the volume is imported at start-up. With REDIS_URL the state is in Redis.
ENV DB_PATH=/data/gateway.db \
    REGISTRY_PATH=/data/registry.json
VOLUME /data

USER gateway
EXPOSE 4000

# No curl in the slim image: the stdlib asks /health (503 when Redis is unreachable -> unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '4000'), timeout=4)"]

# SIGTERM: the gateway closes every socket with 1012 and exits within 10 s (give `docker stop -t 15`).
CMD ["python", "gateway.py"]
