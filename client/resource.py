"""The base every client object shares: an idempotent close() and context-manager support."""
from __future__ import annotations


class _Resource:
    """Idempotent close() and context-manager support for every client object."""
    _closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
    # No __del__: a finalizer would talk to the executor from whatever thread the garbage
    # collector runs on. What a session still holds is freed when the session ends.
