"""What the engine refuses: a request that is not a usable CDS Hooks call (the web layer answers it with a 400)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request cannot be judged; `message` says why in words a client developer acts on."""

    def __init__(self, message: str, *, expression: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression
