"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")
# Tests use the "rbg" PRNG: threefry's random ops take seconds each to compile on a CPU, and the suite
# compiles many small programs. The CLI tests run in subprocesses and keep the library default (threefry).
jax.config.update("jax_default_prng_impl", "rbg")


import pytest  # noqa: E402


@pytest.fixture
def threefry():
    """Use the library default PRNG (threefry): rbg's bits depend on vmap and sharding, threefry's do not."""
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    yield
    jax.config.update("jax_default_prng_impl", previous)
