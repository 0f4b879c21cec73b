"""The context-manager protocol shared by every test service (registries, proxies, daemons)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """``with Service() as s`` starts it and always stops it (``close()``, which is ``stop()``
    unless a service has more to clean up)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
