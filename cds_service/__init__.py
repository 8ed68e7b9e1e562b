"""CDS Hooks service that flags dynamic spinal visualization orders as investigational."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .web.app import create_app

__all__ = ["create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The web stack loads only when asked for: `import cds_service` (and the engine) stay free of Flask.
    if name == "create_app":
        from .web.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
