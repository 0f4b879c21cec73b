"""Password checks off the event loop, in a bounded pool; the back-off of failed logins.

Time is a settable clock (tests/support/inprocess.py ``Clock``): nothing here sleeps. A check
that must stay busy waits on a ``threading.Event`` the test sets.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from mirrorrouter.access import passwords
from mirrorrouter.access.clientauth import Authenticator, NotCached
from mirrorrouter.access.passwords import LoginBackoff, PasswordChecker
from mirrorrouter.config.model import AuthSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from tests.support.inprocess import Clock

pytestmark = pytest.mark.anyio

GOOD = "wonderland"


class Gate:
    """Stands in for bcrypt: every check waits until the test opens the gate, and says in
    which thread it ran."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.threads: list[str] = []

    def __call__(self, password: str, stored: bytes) -> bool:
        self.threads.append(threading.current_thread().name)
        assert self.open.wait(10), "the test never opened the gate"
        return password == GOOD


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    monkeypatch.setattr(passwords, "checkpw", gate)
    yield gate
    gate.open.set()  # never leave a pool thread waiting


async def fail(backoff: LoginBackoff, key: object) -> None:
    async def wrong() -> bool:
        return False

    assert await backoff.guard(key, wrong) is False


async def succeed(backoff: LoginBackoff, key: object) -> None:
    async def right() -> bool:
        return True

    assert await backoff.guard(key, right) is True


async def refusal(backoff: LoginBackoff, key: object) -> RegistryError:
    async def never() -> bool:
        raise AssertionError("a refused attempt must not be checked")

    with pytest.raises(RegistryError) as caught:
        await backoff.guard(key, never)
    assert caught.value.code is ErrorCode.TOOMANYREQUESTS
    assert caught.value.status == 429
    return caught.value


async def test_backoff_starts_after_the_free_failures_and_doubles_to_the_cap() -> None:
    """Five failures are free; then each attempt waits 1 s, 2 s, 4 s ... from the last
    failure, never more than 60 s, and is refused at once with Retry-After meanwhile."""
    clock = Clock()
    backoff = LoginBackoff(clock)
    key = ("user", "alice", "10.0.0.1")
    for _ in range(5):
        await fail(backoff, key)
    waits = []
    for _ in range(12):
        error = await refusal(backoff, key)
        waits.append(int(error.headers["Retry-After"]))
        clock.now += backoff.wait(key)  # exactly the wait: then the next attempt is let in
        await fail(backoff, key)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60]
    clock.now += 59.5
    assert (await refusal(backoff, key)).headers["Retry-After"] == "1"  # rounded up


async def test_backoff_is_per_key_and_a_success_resets_it() -> None:
    """Another address, or another user, has its own count; a success forgets the
    failures, and so do 15 minutes without one."""
    clock = Clock()
    backoff = LoginBackoff(clock)
    alice_here = ("user", "alice", "10.0.0.1")
    for _ in range(5):
        await fail(backoff, alice_here)
    await refusal(backoff, alice_here)
    for other in (("user", "alice", "10.0.0.2"), ("user", "bob", "10.0.0.1")):
        await fail(backoff, other)  # not refused
    clock.now += 1
    await succeed(backoff, alice_here)
    for _ in range(5):
        await fail(backoff, alice_here)  # five free failures again
    await refusal(backoff, alice_here)
    clock.now += passwords.BACKOFF_FORGET
    await fail(backoff, alice_here)  # forgotten


async def test_attempts_in_progress_count_against_the_free_failures(gate: Gate) -> None:
    """A burst of ten concurrent attempts for one key: five are checked, five refused at
    once, so a burst cannot slip past the count while checks are running."""
    checker = PasswordChecker(workers=2, waiting=16)
    backoff = LoginBackoff(Clock())
    key = ("user", "alice", "10.0.0.1")
    attempts = [
        asyncio.ensure_future(backoff.guard(key, lambda: checker.check("guess", b"x")))
        for _ in range(10)
    ]
    await asyncio.sleep(0)  # every attempt runs to its first await
    refusals = [a for a in attempts if a.done()]
    assert len(refusals) == 5
    assert all(isinstance(a.exception(), RegistryError) for a in refusals)
    gate.open.set()
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert [r for r in results if r is False] == [False] * 5
    checker.close()


async def test_checks_run_in_their_own_bounded_pool(gate: Gate) -> None:
    """bcrypt runs in the pool's own threads, never on the loop; past the pool's bound a
    check is answered 503 with Retry-After at once instead of queueing."""
    checker = PasswordChecker(workers=2, waiting=1)
    running = [asyncio.ensure_future(checker.check("guess", b"x")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(RegistryError) as busy:
        await checker.check("guess", b"x")
    assert busy.value.code is ErrorCode.UNAVAILABLE
    assert busy.value.headers["Retry-After"] == "1"
    gate.open.set()
    assert await asyncio.gather(*running) == [False, False, False]
    assert gate.threads and all(name.startswith("bcrypt") for name in gate.threads)
    assert await checker.check(GOOD, b"x") is True  # the slots were given back
    checker.close()


async def test_a_password_bcrypt_cannot_take_is_just_wrong() -> None:
    """Over 72 bytes (bcrypt raises) or against a broken entry: False, never an exception."""
    stored = bcrypt.hashpw(b"short", bcrypt.gensalt(4))
    checker = PasswordChecker()
    assert await checker.check("x" * 73, stored) is False
    assert await checker.check("é" * 37, stored) is False  # 74 bytes in UTF-8
    assert passwords.checkpw("x" * 100, stored) is False
    assert passwords.checkpw("short", b"$2b$04$broken") is False
    assert await checker.check("short", stored) is True
    checker.close()


def authenticator(tmp_path: Path, clock: Clock) -> Authenticator:
    stored = bcrypt.hashpw(GOOD.encode(), bcrypt.gensalt(4)).decode()
    (tmp_path / "htpasswd").write_text(f"alice:{stored}\n")
    settings = AuthSettings(htpasswd=tmp_path / "htpasswd", secret_file=tmp_path / "secret")
    return Authenticator(settings, clock=clock, monotonic=clock)


async def test_a_cached_good_credential_is_never_delayed(tmp_path: Path) -> None:
    """alice's proven password still opens the door while her name is in back-off from
    an attacker's guesses at her address; the guesses are refused."""
    clock = Clock()
    auth = authenticator(tmp_path, clock)
    assert await auth.check_password("alice", GOOD, "10.0.0.1")
    for _ in range(5):
        assert not await auth.check_password("alice", "guess", "10.0.0.1")
    for _ in range(3):
        with pytest.raises(RegistryError) as caught:
            await auth.check_password("alice", "guess", "10.0.0.1")
        assert caught.value.code is ErrorCode.TOOMANYREQUESTS
        assert await auth.check_password("alice", GOOD, "10.0.0.1")
    auth.close()


async def test_unknown_users_back_off_per_address(tmp_path: Path) -> None:
    """Guesses at names that do not exist count per address, whatever the name; another
    address, and a real user at that address, are not held back."""
    auth = authenticator(tmp_path, Clock())
    for index in range(5):
        assert not await auth.check_password(f"nobody{index}", "guess", "10.0.0.1")
    with pytest.raises(RegistryError) as caught:
        await auth.check_password("someone-else", "guess", "10.0.0.1")
    assert caught.value.code is ErrorCode.TOOMANYREQUESTS
    assert not await auth.check_password("someone-else", "guess", "10.0.0.2")
    assert await auth.check_password("alice", GOOD, "10.0.0.1")
    auth.close()


async def test_only_cached_credentials_are_decided_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cached_identity`` (the fast path's) never runs bcrypt: a Basic pair not proven good
    is ``NotCached``; once ``identify`` proved it (in the pool), it is answered at once."""
    auth = authenticator(tmp_path, Clock())
    checks: list[str] = []

    def check(password: str, stored: bytes) -> bool:
        checks.append(threading.current_thread().name)
        return password == GOOD

    monkeypatch.setattr(passwords, "checkpw", check)
    header = "Basic " + base64.b64encode(f"alice:{GOOD}".encode()).decode()
    with pytest.raises(NotCached):
        auth.cached_identity(header)
    assert checks == []
    identity = await auth.identify(header, "10.0.0.1")
    assert identity is not None and identity.user == "alice"
    assert auth.cached_identity(header) == identity
    assert len(checks) == 1 and checks[0].startswith("bcrypt")
    assert auth.cached_identity(None) is None
    auth.close()
