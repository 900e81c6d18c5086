"""The OpenAI-compatible HTTP router (aiohttp): validates and tokenizes requests, submits them to the
coordinators over NATS, and streams the instances' tokens back as text. Run: `python -m services.router`.
"""

from services.router.app import create_app

__all__ = ["create_app"]
