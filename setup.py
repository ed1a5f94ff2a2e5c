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
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "pillow>=10",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",  # tfds 4.9.10 packaging bug: needed to prepare datasets
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "matplotlib>=3.8",   # ssl-jax report: PNG plots
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
