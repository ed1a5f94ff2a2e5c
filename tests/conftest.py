"""Test setup: 8 fake CPU devices and a persistent compilation cache, set before JAX is imported anywhere."""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's persistent compilation cache, one directory per test process (each xdist worker; the subprocesses a
# test starts inherit it): several tests compile the same training step again and again (the resume tests'
# five train() calls, the checkpoint tests' reruns), and loading it back is several times faster than
# compiling it on a 2-core CPU. Only programs that took over a second to compile are written: writing every
# small one made the suite slower (measured on tests/test_moco.py + test_barlow_twins.py: 179 s against
# 153 s without the cache; with the 1 s threshold 153 s, while test_resume.py + test_checkpoint.py went
# from 276 s to 142 s). Not shared between workers: JAX writes cache files without a lock. Removed when the
# process ends. A load still counts as a compilation for jax.log_compiles ("Finished XLA compilation" wraps
# both), so the compile-once tests keep their meaning.
_XLA_CACHE = tempfile.mkdtemp(prefix=f"ssl_jax_tests_xla_cache_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")
# Tests use the "rbg" PRNG: threefry's random ops take seconds each to compile on a CPU, and the suite
# compiles many small programs. The CLI tests run in subprocesses and keep the library default (threefry).
jax.config.update("jax_default_prng_impl", "rbg")


import pytest  # noqa: E402


def pytest_unconfigure(config):
    """Removes this process's compilation cache."""
    del config
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture
def threefry():
    """Use the library default PRNG (threefry): rbg's bits depend on vmap and sharding, threefry's do not."""
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    yield
    jax.config.update("jax_default_prng_impl", previous)
