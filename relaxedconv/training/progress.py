"""A small progress bar (tqdm when installed, else a one-line ``\\r`` bar on a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, desc, enabled) as p: p.update(1, loss=...)``.

    enabled: True, False, or None (= only when stderr is a terminal)."""

    def __init__(self, total: int, desc: str = "", enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.desc, self.enabled = int(total), desc, bool(enabled)
        self.n, self.t0, self._last, self._postfix = 0, time.time(), 0.0, ""
        self._tqdm = None
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm(total=self.total, desc=desc, leave=False, file=self.stream, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._tqdm is not None:
            if postfix:
                self._tqdm.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False)
            self._tqdm.update(n)
            return
        now = time.time()
        if postfix:
            self._postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        if now - self._last < 0.2 and self.n < self.total:
            return
        self._last = now
        frac = self.n / max(self.total, 1)
        bar = "#" * int(24 * frac)
        el = now - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        self.stream.write(f"\r{self.desc} [{bar:<24}] {self.n}/{self.total} {el:.0f}s<{eta:.0f}s {self._postfix}\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar from its line so that a message printed now starts on a clean line (it was
        appended to the bar's text); the next update draws the bar again."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.clear()
        else:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._last = 0.0

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
