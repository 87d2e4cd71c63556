"""``xmr serve``: a JSON API and a search page over one Engine."""

from .app import create_app

__all__ = ["create_app"]
