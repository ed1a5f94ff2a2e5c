"""Backbones and heads: `get_backbone(name) -> (module, feature_dim)`, `backbone_from_config`, `MLPHead`,
`LinearClassifier`."""
from ssl_jax.models.heads import LinearClassifier, MLPHead
from ssl_jax.models.resnet import ResNet, backbone_from_config, get_backbone

__all__ = ["LinearClassifier", "MLPHead", "ResNet", "backbone_from_config", "get_backbone"]
