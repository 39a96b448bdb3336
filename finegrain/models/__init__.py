"""Networks only: plain nn.Modules that return a `ModelOutput`. Lightning wraps them in finegrain.tasks."""

from __future__ import annotations

import inspect

from torch import nn

from finegrain.errors import FinegrainError
from finegrain.models.classifier import Classifier
from finegrain.models.racnn import RACNN
from finegrain.models.result import ModelOutput
from finegrain.models.stn import STCNN

# method name -> network class; each takes num_classes, backbone, weights and its own keyword arguments, has
# `lr_groups()`, and names its `branch_names` (keys of ModelOutput.branch_logits) and `box_names` (of .boxes).
NETWORKS: dict[str, type[nn.Module]] = {"baseline": Classifier, "stn": STCNN, "racnn": RACNN}


def build_network(method: str, **kwargs) -> nn.Module:
    """Make the network of a method from its config arguments."""
    if method not in NETWORKS:
        raise FinegrainError(f"model.method {method!r} is unknown; choose one of {sorted(NETWORKS)}")
    network = NETWORKS[method]
    accepted = inspect.signature(network).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise FinegrainError(
            f"model.method_args {unknown} do not belong to method {method!r}; it takes {sorted(accepted)}"
        )
    return network(**kwargs)


__all__ = ["NETWORKS", "ModelOutput", "build_network"]
