"""`python -m ssl_jax ...` is `ssl-jax ...`."""
from ssl_jax.cli import run

run()
