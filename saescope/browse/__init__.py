"""``saescope browse``: a local web server over a run directory's SAEs and their dashboards."""

from saescope.browse.server import BrowseApp, find_saes, make_server, serve

__all__ = ["BrowseApp", "find_saes", "make_server", "serve"]
