"""feedloop.trainer."""
