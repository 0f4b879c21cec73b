"""Load the tables of shared storage and coordination: ``[cache.s3]`` (and an upstream's
``[upstreams."x".cache.s3]``) and ``[coordination]``.

Secrets (S3 keys, a Redis URL with a password) come from the environment: the file names the
variable (``*_env``), never the value.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mirrorrouter.config.model import CoordinationSettings, ObjectStoreSettings, Secret
from mirrorrouter.config.reader import Reader, Table, one_of

BACKENDS = ("filesystem", "s3")


def load_object_store(
    reader: Reader, table: Table, inherited: ObjectStoreSettings | None
) -> ObjectStoreSettings | None:
    """``[cache.s3]`` or an upstream's ``cache.s3``: keys left out are inherited."""
    if not table.present:
        table.finish()
        return inherited
    base = inherited or ObjectStoreSettings(bucket="")
    bucket = table.get("bucket", str, base.bucket or None, required=not base.bucket)
    endpoint = table.get("endpoint", str, base.endpoint, check=_endpoint)
    region = table.get("region", str, base.region)
    prefix = table.get("prefix", str, base.prefix).strip("/")
    key_id = _secret(reader, table, "access_key_id_env", base.access_key_id)
    secret = _secret(reader, table, "secret_access_key_env", base.secret_access_key)
    redirect = table.get("redirect", bool, base.redirect)
    table.finish()
    if (key_id is None) != (secret is None):
        reader.problem(
            table.path, "set both access_key_id_env and secret_access_key_env, or neither"
        )
    if not bucket:
        return None
    return ObjectStoreSettings(bucket, endpoint, region, prefix, key_id, secret, redirect)


def check_backend(
    reader: Reader, path: tuple[str | int, ...], backend: str, store: ObjectStoreSettings | None
) -> None:
    if backend == "s3" and store is None:
        reader.problem(path, 'backend "s3" needs a [cache.s3] table with at least a bucket')


def load_coordination(reader: Reader, table: Table) -> CoordinationSettings:
    """``[coordination]``: absent means in-process coordination (one machine)."""
    backend = table.get("backend", str, "local", check=one_of("local", "redis"))
    url = table.get("redis_url", str, None, check=_redis_url)
    url_env = table.get("redis_url_env", str, None)
    key_prefix = table.get("key_prefix", str, "mirrorrouter")
    lock_ttl = table.duration("lock_ttl", 30.0, positive=True)
    advertise = table.get("advertise_url", str, None, check=_endpoint)
    advertise_env = table.get("advertise_url_env", str, None)
    table.finish()
    if url is not None and url_env is not None:
        reader.problem(table.path, "set redis_url or redis_url_env, not both")
    if url_env is not None:
        url = reader.env.get(url_env)
        if url is None:
            reader.problem((*table.path, "redis_url_env"), f"${url_env} is not set")
        elif _redis_url(url):
            reader.problem((*table.path, "redis_url_env"), f"${url_env} is not a redis:// URL")
    if backend == "redis" and url is None and url_env is None:
        reader.problem(table.path, 'backend "redis" needs redis_url or redis_url_env')
    if advertise_env is not None:
        advertise = reader.env.get(advertise_env)
        if advertise is None:
            reader.problem((*table.path, "advertise_url_env"), f"${advertise_env} is not set")
    return CoordinationSettings(
        backend=backend,
        redis_url=Secret(url) if url else None,
        key_prefix=key_prefix,
        lock_ttl=lock_ttl,
        advertise_url=advertise.rstrip("/") if advertise else None,
    )


def _secret(reader: Reader, table: Table, key: str, inherited: Secret | None) -> Secret | None:
    name = table.get(key, str, None)
    if name is None:
        return inherited
    value = reader.env.get(name)
    if value is None:
        reader.problem((*table.path, key), f"${name} is not set")
        return None
    return Secret(value)


def _endpoint(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.netloc and not parts.query:
        return None
    return "an http:// or https:// URL such as http://127.0.0.1:8333"


def _redis_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme in ("redis", "rediss", "unix") and (parts.netloc or parts.path):
        return None
    return "a URL such as redis://redis:6379/0 (a password belongs in redis_url_env)"
