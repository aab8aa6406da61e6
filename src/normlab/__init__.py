"""normlab: Batch, Layer, Instance and Group Normalization studies on CIFAR."""
from .models import cifar_resnet
from .norms import group_norm_reference, make_norm, parse_norm

__version__ = "0.1.0"
__all__ = ["cifar_resnet", "make_norm", "parse_norm", "group_norm_reference", "__version__"]
