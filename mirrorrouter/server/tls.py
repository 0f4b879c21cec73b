"""The HTTPS listener's TLS: its context, its certificate reloaded in place, the file checks.

- ``server_context`` builds the ``ssl.SSLContext`` of ``[server.tls]``: the certificate chain
  and key, the minimum version, and with ``client_ca`` a required client certificate (mTLS:
  a client without one signed by that CA is refused during the handshake).
- ``Certificates`` keeps one worker's context current. ``load_cert_chain`` on the live
  context changes what new handshakes present while connections already open keep theirs,
  so nothing restarts and nothing is dropped. It reloads when the files change on disk (a
  stat every ``WATCH_INTERVAL`` seconds, in a thread: cert-manager and the kubelet replace a
  Secret's files by swapping a symlink, so the inode changes) and on SIGHUP (running.py).
  A new pair is read once, checked (PEM, the key belongs to the certificate, OpenSSL takes
  it in a context of its own) and only then loaded into the live context, from the same
  bytes: a bad file, or a pair caught half-replaced, logs an error naming the file and the
  old certificate stays.
- ``check_files`` is what ``check-config`` (and ``serve``, before starting) says about the
  files: readable, PEM, key matches certificate, validity dates, ``client_ca`` parses.

The context is made in each worker process (an ``SSLContext`` cannot be pickled to them),
so each worker watches and reloads on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mirrorrouter.config.model import ServerTlsSettings

log = logging.getLogger("mirrorrouter.tls")

WATCH_INTERVAL = 2.0  # seconds between two looks at the files' inode, size and mtime
EXPIRY_WARNING = datetime.timedelta(days=14)  # cert-manager renews 30 days ahead by default
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertificateError(Exception):
    """A certificate, key or CA file that cannot be used; ``key`` is its config key."""

    def __init__(self, key: str, path: Path, message: str) -> None:
        super().__init__(f"server.tls.{key} ({path}): {message}")
        self.key = key
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """A certificate chain and its key as read from disk, checked to belong together."""

    chain_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial_number:x}"

    def describe(self) -> str:
        until = self.leaf.not_valid_after_utc
        return f"serial {self.serial}, valid until {until:%Y-%m-%d %H:%M} UTC"


def read_pair(tls: ServerTlsSettings) -> CertificatePair:
    """Read and check ``certificate`` and ``key``; ``CertificateError`` names what is wrong."""
    chain_pem = _read(tls.certificate, "certificate")
    key_pem = _read(tls.key, "key")
    chain = _certificates(chain_pem, tls.certificate, "certificate")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:  # encrypted
        raise CertificateError("key", tls.key, "an encrypted key; give it unencrypted") from exc
    except ValueError as exc:
        raise CertificateError("key", tls.key, "not a PEM private key") from exc
    if _public(key.public_key()) != _public(chain[0].public_key()):
        raise CertificateError(
            "key", tls.key, f"does not belong to the certificate in {tls.certificate}"
        )
    pair = CertificatePair(chain_pem, key_pem, chain[0])
    try:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair)
    except ssl.SSLError as exc:  # what OpenSSL refuses that the parse let through
        message = f"refused by OpenSSL: {exc}"
        raise CertificateError("certificate", tls.certificate, message) from exc
    return pair


def server_context(tls: ServerTlsSettings, pair: CertificatePair) -> ssl.SSLContext:
    """The listener's context: ``pair``, the minimum version, client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[tls.min_version]
    context.set_alpn_protocols(["http/1.1"])
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError("client_ca", tls.client_ca, f"cannot load: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    _load_chain(context, pair)
    return context


class Certificates:
    """One worker's live context and the reload of its certificate (see the module doc)."""

    def __init__(self, tls: ServerTlsSettings) -> None:
        self.tls = tls
        self._stamp = _stamp(tls)
        self.pair = read_pair(tls)
        self.context = server_context(tls, self.pair)
        self._lock = asyncio.Lock()
        log.info("TLS certificate %s: %s", tls.certificate, self.pair.describe())
        _warn_expiry(self.pair.leaf, tls.certificate)

    async def watch(self) -> None:
        """Reload whenever the files change on disk; runs until cancelled."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            stamp = await asyncio.to_thread(_stamp, self.tls)
            if stamp != self._stamp:
                await self.reload("the files changed")

    async def reload(self, why: str) -> bool:
        """Read the files again and, when they are good, present them from now on."""
        async with self._lock:
            self._stamp = await asyncio.to_thread(_stamp, self.tls)
            try:
                pair = await asyncio.to_thread(read_pair, self.tls)
            except CertificateError as exc:
                log.error(
                    "TLS certificate not reloaded (%s): %s; still serving %s",
                    why,
                    exc,
                    self.pair.describe(),
                )
                return False
            if pair.chain_pem == self.pair.chain_pem and pair.key_pem == self.pair.key_pem:
                log.info("TLS certificate unchanged (%s): %s", why, pair.describe())
                return True
            # On the event loop, between handshakes: the context is not shared with a thread.
            _load_chain(self.context, pair)
            self.pair = pair
        log.info(
            "TLS certificate reloaded (%s) from %s: %s", why, self.tls.certificate, pair.describe()
        )
        _warn_expiry(pair.leaf, self.tls.certificate)
        return True


# ------------------------------------------------------------------------ check-config


@dataclass(frozen=True, slots=True)
class Finding:
    """What ``check-config`` says about one file: a problem, or a warning."""

    key: str  # server.tls.<key>
    message: str
    warning: bool = False

    def __str__(self) -> str:
        return f"server.tls.{self.key}: {self.message}"


def check_files(tls: ServerTlsSettings, now: datetime.datetime | None = None) -> list[Finding]:
    """Everything wrong with the files of ``[server.tls]``; warnings for what is only soon."""
    findings = []
    try:
        pair = read_pair(tls)
    except CertificateError as exc:
        findings.append(Finding(exc.key, f"{exc.path}: {exc.message}"))
    else:
        problem = validity_problem(pair.leaf, now)
        if problem is not None:
            warning = problem.startswith("expires")
            findings.append(Finding("certificate", f"{tls.certificate}: {problem}", warning))
    if tls.client_ca is not None:
        try:
            read_certificates(tls.client_ca, "client_ca")
            ssl.create_default_context(cafile=str(tls.client_ca))
        except CertificateError as exc:
            findings.append(Finding("client_ca", f"{exc.path}: {exc.message}"))
        except ssl.SSLError as exc:
            findings.append(Finding("client_ca", f"{tls.client_ca}: refused by OpenSSL: {exc}"))
    return findings


def validity_problem(cert: x509.Certificate, now: datetime.datetime | None = None) -> str | None:
    """``expired ...``, ``not valid before ...``, ``expires in N days ...`` or None."""
    now = now or datetime.datetime.now(datetime.UTC)
    until, since = cert.not_valid_after_utc, cert.not_valid_before_utc
    if until <= now:
        return f"expired on {until:%Y-%m-%d %H:%M} UTC"
    if since > now:
        return f"not valid before {since:%Y-%m-%d %H:%M} UTC"
    if until - now <= EXPIRY_WARNING:
        return f"expires in {(until - now).days} days ({until:%Y-%m-%d %H:%M} UTC)"
    return None


def chain_root(path: Path) -> x509.Certificate | None:
    """The self-signed certificate that ends the chain in ``path`` (a self-signed server
    certificate, or a root the chain includes); None when the chain stops below its root."""
    last = read_certificates(path, "certificate")[-1]
    return last if last.issuer == last.subject else None


def read_certificates(path: Path, key: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path``; ``CertificateError`` (for config key ``key``) when
    it cannot be read or holds none."""
    return _certificates(_read(path, key), path, key)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


# ------------------------------------------------------------------------ helpers


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(key, path, f"cannot read: {exc.strerror}") from exc


def _certificates(pem: bytes, path: Path, key: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(key, path, "no PEM certificate in it") from exc


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(tls: ServerTlsSettings) -> Stamp:
    """What tells a replaced file: device, inode, size and mtime of each (None: missing)."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in (tls.certificate, tls.key):
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _warn_expiry(cert: x509.Certificate, path: Path) -> None:
    problem = validity_problem(cert)
    if problem is not None:
        level = logging.WARNING if problem.startswith("expires") else logging.ERROR
        log.log(level, "TLS certificate %s %s", path, problem)


def _load_chain(context: ssl.SSLContext, pair: CertificatePair) -> None:
    """``load_cert_chain`` from the bytes already checked, not from the files again (which
    may have changed since): through memory files, never written to a disk."""
    with _memory_file(pair.chain_pem) as chain, _memory_file(pair.key_pem) as key:
        context.load_cert_chain(chain, key)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that reads ``data``: a memfd (Linux), else a private temp file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mirrorrouter-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="mirrorrouter-tls-") as directory:  # pragma: no cover
        path = Path(directory) / "pem"
        path.write_bytes(data)
        yield str(path)
