"""The web demo (``keye web``): a stdlib HTTP server and one static page, no web framework.

``WebDemo`` holds the engine and shared state, ``make_server`` binds it to a host and port; see ``server`` for the
routes and ``media`` for upload checks, samples and thumbnails.
"""

from .media import WebError, write_samples
from .server import WebDemo, make_server, serve

__all__ = ["WebDemo", "WebError", "make_server", "serve", "write_samples"]
