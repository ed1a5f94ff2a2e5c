"""ssl_jax: self-supervised visual representation learning in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ssl-jax",
    version="0.1.0",
    description="Self-supervised visual representation learning (SimCLR, MoCo, BYOL, ...) in JAX/Flax.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ssl_jax", "ssl_jax.*"]),
    python_requires=">=3.11",
    # Lower bounds, checked with jax 0.10.2 and numpy 2.4.6 on Python 3.11 (2026-11-24): with flax 0.12.2, optax
    # 0.2.5, orbax-checkpoint 0.11.17, ml-collections 1.0.0, tensorflow-datasets 4.9.8 and tensorboardX 2.6.2.2
    # the whole suite passes (365 passed, 9 skipped: no torch); with pillow 10.0.0, matplotlib 3.9.0,
    # safetensors 0.4.0 and tqdm 4.60.0 on top, tests/test_{data,jpeg_pipeline,export,report}.py pass. One
    # release older fails: flax 0.12.1 passes jax.checkpoint's removed `concrete` option (model.remat),
    # orbax-checkpoint 0.11.16 needs jax.experimental.layout.DeviceLocalLayout, tfds 4.9.7 imports gcsfs and
    # tensorflow to list its catalog, tensorboardX 2.6.1 calls float() on a 1-element array (numpy 2.4 refuses),
    # matplotlib 3.8.0 is built for numpy 1.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.2",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.17",
        "ml-collections>=1.0",
        "numpy>=2.0",  # jax 0.10.2's own bound
        "pillow>=10",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tfds 4.9.10 packaging bug: needed to prepare datasets
        "tensorboardX>=2.6.2.2",
        "tqdm>=4.60",
        "matplotlib>=3.9",   # ssl-jax report: PNG plots
        "safetensors>=0.4",  # ssl-jax export --format safetensors
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3"],
        "tf": ["tensorflow>=2.16"],
        "torch": ["torch", "torchvision"],  # ssl-jax export --format torch, and its parity tests
    },
    entry_points={"console_scripts": ["ssl-jax=ssl_jax.cli:run"]},
    classifiers=["Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12"],
)
