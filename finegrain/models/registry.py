"""The one list of networks: a class decorated with `register_network` is a network finegrain can train, save and
load again.

A network is a plain `nn.Module` whose constructor takes `num_classes` (and, to get its preprocessing from timm,
`backbone`: a timm name); its forward returns a `ModelOutput`; `lr_groups()` splits its parameters into
learning-rate groups; `branch_names` and `box_names` name the keys of `ModelOutput.branch_logits` and `.boxes`.
The decorator records each instance's constructor arguments in `init_args`, so that a checkpoint or package stores
`{"class_path", "init_args"}` and builds the same network again, as `finegrain fit` recipes write it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import TypeVar

from torch import nn

from finegrain.errors import FinegrainError

NETWORKS: dict[str, type[nn.Module]] = {}  # class path -> class
# `model.method` of recipes, checkpoints and packages written before networks were given by class_path
METHOD_CLASS_PATHS = {"baseline": "finegrain.models.Classifier", "stn": "finegrain.models.STCNN",
                      "racnn": "finegrain.models.RACNN"}  # fmt: skip
NetworkType = TypeVar("NetworkType", bound=type[nn.Module])


def class_path(cls: type) -> str:
    """Where a class is imported from; the package's own networks by their public path (finegrain.models.X)."""
    public = f"finegrain.models.{cls.__qualname__}"
    return public if cls.__module__.startswith("finegrain.models.") else f"{cls.__module__}.{cls.__qualname__}"


def register_network(cls: NetworkType) -> NetworkType:
    """Class decorator: list `cls` in NETWORKS and record every instance's constructor arguments in `init_args`."""
    signature = inspect.signature(cls.__init__)
    if "num_classes" not in signature.parameters:
        raise TypeError(f"network {cls.__qualname__} must take num_classes (the classifier's width)")
    init = cls.__init__

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs) -> None:
        if "init_args" not in self.__dict__:  # the class built, not a parent calling super().__init__
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))  # self
            for name, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(arguments.pop(name, {}))
            self.__dict__["init_args"] = arguments
        init(self, *args, **kwargs)

    cls.__init__ = recording_init
    NETWORKS[class_path(cls)] = cls
    return cls


def network_config(network: nn.Module) -> dict:
    """`{"class_path", "init_args"}` of a registered network instance: what rebuilds it (weights excluded)."""
    cls = type(network)
    if class_path(cls) not in NETWORKS or "init_args" not in network.__dict__:
        raise FinegrainError(f"{cls.__qualname__} is not a registered network: decorate its class with "
                             "@finegrain.models.register_network")  # fmt: skip
    return {"class_path": class_path(cls), "init_args": dict(network.__dict__["init_args"])}


def network_class(path: str) -> type[nn.Module]:
    """The registered network class at `path` (importing its module if it is not loaded yet)."""
    if path not in NETWORKS:
        module, _, name = path.rpartition(".")
        try:
            if module:  # a bare name ("racnn9") has no module to import: it is not registered, said below
                importlib.import_module(module)
        except ImportError as e:
            raise FinegrainError(f"network {path} cannot be imported ({e}); install the package that defines it, "
                                 f"or choose one of {', '.join(sorted(NETWORKS))}") from None  # fmt: skip
    if path not in NETWORKS:
        raise FinegrainError(f"{path} is not a registered network; choose one of {', '.join(sorted(NETWORKS))}, "
                             "or decorate the class with @finegrain.models.register_network")  # fmt: skip
    return NETWORKS[path]


def create_network(path: str, **init_args) -> nn.Module:
    """Build a registered network from its class path (or a short method name: baseline, stn, racnn)."""
    cls = network_class(METHOD_CLASS_PATHS.get(path, path))
    accepted = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(init_args) - set(accepted))
    if unknown and not takes_any:
        raise FinegrainError(f"{unknown} are not arguments of network {class_path(cls)}; it takes "
                             f"{sorted(set(accepted) - {'self'})}")  # fmt: skip
    return cls(**init_args)
