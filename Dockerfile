# mirrorrouter: one container-registry mirror in front of every registry a team pulls from.
#
#   docker build -t mirrorrouter .
#   docker run -p 5000:5000 -v mirrorrouter-cache:/var/cache/mirrorrouter mirrorrouter
#
# Arguments after the image name go to `mirrorrouter serve` (for example `--workers 4`).
# docs/deployment.md has docker compose, Kubernetes, and what each line here is for.
# Any Debian-based image with python3 (3.11+) and python3-venv works as the base: the tests
# build it with `podman build --from` a base made from Debian packages (tests/test_real_image.py).
FROM python:3.11-slim

LABEL org.opencontainers.image.title="mirrorrouter" \
      org.opencontainers.image.description="One container-registry mirror in front of every registry a team pulls from" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MIRRORROUTER_CONFIG=/etc/mirrorrouter/mirrors.toml \
    PATH=/opt/mirrorrouter/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# A fixed uid and gid (10001): the Kubernetes manifests run as these numbers, and only
# the cache volume is the user's to write.
RUN groupadd --system --gid 10001 mirrorrouter \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin mirrorrouter \
    && mkdir -p /etc/mirrorrouter /var/cache/mirrorrouter \
    && chown 10001:10001 /var/cache/mirrorrouter

# Into a venv of its own: the base's Python stays untouched (a Debian base has no pip of its
# own). pip reads /etc/pip.conf, so an offline build mounts wheels and a pip.conf there.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirrorrouter ./mirrorrouter
RUN python3 -m venv /opt/mirrorrouter \
    && /opt/mirrorrouter/bin/pip install --no-cache-dir . \
    && rm -rf /src

# The default config, with the cache on the volume below. The build fails here when the
# sed no longer matches mirrors.toml (tests/test_deploy.py runs these two lines too).
COPY mirrors.toml /etc/mirrorrouter/mirrors.toml
RUN sed -i 's|^directory = "cache" |directory = "/var/cache/mirrorrouter" |' \
        /etc/mirrorrouter/mirrors.toml \
    && grep -q '^directory = "/var/cache/mirrorrouter"' /etc/mirrorrouter/mirrors.toml

# Relative paths given to `docker exec ... mirrorrouter check-config` resolve here.
WORKDIR /etc/mirrorrouter
USER 10001:10001
VOLUME /var/cache/mirrorrouter
EXPOSE 5000
# /healthz on the port the config names (server.port), so a config with another port keeps
# a working check; it needs no login, unlike /v2/ with [auth] on. Readiness (/readyz) is for
# orchestrators that route traffic; a restart would not mend what it reports.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["mirrorrouter", "healthcheck", "--timeout", "4"]
ENTRYPOINT ["mirrorrouter", "serve", "--config", "/etc/mirrorrouter/mirrors.toml"]
