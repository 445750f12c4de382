"""Live counters of a run, shown as a tqdm bar on a TTY (quiet otherwise)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

__all__ = ["Progress"]


class Progress:
    """Counts done / failed / skipped / in flight; draws a bar when ``enabled``."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.total = 0
        self.done = 0
        self.failed_count = 0
        self.skipped_count = 0
        self.in_flight = 0
        self.rate_limits = 0
        self._bar: Any = None

    def __enter__(self) -> Self:
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="item", dynamic_ncols=True, leave=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.close()
            self._bar = None

    def _refresh(self, advance: int = 0) -> None:
        if self._bar is None:
            return
        self._bar.total = self.total
        self._bar.set_postfix(
            done=self.done, failed=self.failed_count, skipped=self.skipped_count,
            in_flight=self.in_flight, refresh=False,
        )  # fmt: skip
        self._bar.update(advance)

    def discovered(self, n: int) -> None:
        self.total += n
        self._refresh()

    def started(self) -> None:
        self.in_flight += 1
        self._refresh()

    def stopped(self) -> None:
        self.in_flight -= 1
        self._refresh()

    def succeeded(self) -> None:
        self.done += 1
        self._refresh(1)

    def failed(self) -> None:
        self.failed_count += 1
        self._refresh(1)

    def skipped(self) -> None:
        self.skipped_count += 1
        self._refresh(1)

    def rate_limited(self) -> None:
        self.rate_limits += 1
