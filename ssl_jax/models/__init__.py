"""Backbones and heads: `get_backbone(name) -> (module, feature_dim)`, `MLPHead`, `LinearClassifier`."""
from ssl_jax.models.heads import LinearClassifier, MLPHead
from ssl_jax.models.resnet import ResNet, get_backbone

__all__ = ["LinearClassifier", "MLPHead", "ResNet", "get_backbone"]
