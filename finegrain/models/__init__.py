"""Networks only: plain nn.Modules that return a `ModelOutput`. Lightning wraps them in finegrain.tasks."""

from __future__ import annotations

import inspect
import typing

import yaml
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
    return network(**{name: _from_command_line(network, name, value) for name, value in kwargs.items()})


def _from_command_line(network: type[nn.Module], name: str, value: object) -> object:
    """`--model.method_args.min_scale 0.4` reaches us as the string "0.4" (method_args is a free dict, so
    jsonargparse cannot type it): read a string as YAML, as a config file would be, unless the argument takes
    strings."""
    hint = typing.get_type_hints(network.__init__).get(name)
    if not isinstance(value, str) or hint is str or str in typing.get_args(hint):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise FinegrainError(f"model.method_args.{name}: cannot read {value!r} ({error})") from None
    if hint in (int, float) and (isinstance(parsed, bool) or not isinstance(parsed, int | float)):
        raise FinegrainError(f"model.method_args.{name} must be a number, got {value!r}")
    return parsed


__all__ = ["NETWORKS", "ModelOutput", "build_network"]
