"""feedloop.client."""
