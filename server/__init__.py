"""feedloop.server."""
