"""feedloop.demo: the loop with simulated users, for `feedloop demo`, the benches and the tests.

- `simusers`: simulated people with a hidden preference who answer with noisy feedback;
- `simulate`: an in-process stand-in for the server and its users (trainer tests and benches);
- `processes`: `feedloop serve` / `feedloop train` as child processes;
- `cli` with `options`, `population`, `tracker` and `report`: the `feedloop demo` command.

Installed with the `[demo]` extra; nothing else in feedloop imports it.
"""
