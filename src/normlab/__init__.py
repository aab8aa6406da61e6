"""normlab: Batch, Layer, Instance and Group Normalization studies on CIFAR."""
from .models import cifar_resnet
from .norms import group_norm_reference, make_norm, parse_norm

__version__ = "0.1.0"
__all__ = ["cifar_resnet", "make_norm", "parse_norm", "group_norm_reference", "load_results", "__version__"]


def __getattr__(name):
    # normlab.load_results(path) -> Results(runs, curves, probes); imported on first use (scipy, csv)
    if name == "load_results":
        from .report import load_results
        return load_results
    raise AttributeError(f"module 'normlab' has no attribute '{name}'")
