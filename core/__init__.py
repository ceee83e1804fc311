"""feedloop.core."""
