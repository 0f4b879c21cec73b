# mirrorrouter: one container-registry mirror in front of every registry a team pulls from.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/mirrorrouter --shell /usr/sbin/nologin \
        mirrorrouter \
    && mkdir -p /etc/mirrorrouter /var/cache/mirrorrouter \
    && chown mirrorrouter /var/cache/mirrorrouter

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirrorrouter ./mirrorrouter
RUN pip install --no-cache-dir . && rm -rf /src

# The default config, with the cache on the volume below.
COPY mirrors.toml /etc/mirrorrouter/mirrors.toml
RUN sed -i 's|^directory = "cache" |directory = "/var/cache/mirrorrouter" |' \
        /etc/mirrorrouter/mirrors.toml \
    && grep -q '^directory = "/var/cache/mirrorrouter"' /etc/mirrorrouter/mirrors.toml

USER mirrorrouter
VOLUME /var/cache/mirrorrouter
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/v2/')"
ENTRYPOINT ["mirrorrouter", "serve", "--config", "/etc/mirrorrouter/mirrors.toml"]
