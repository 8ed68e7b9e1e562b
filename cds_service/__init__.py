"""CDS Hooks service that flags dynamic spinal visualization orders as investigational."""

from .app import create_app

__all__ = ["create_app"]
__version__ = "0.1.0"
