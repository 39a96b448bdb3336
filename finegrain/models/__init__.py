"""Networks only: plain nn.Modules that return a `ModelOutput`. Lightning wraps them in finegrain.tasks."""

from finegrain.models.classifier import Classifier
from finegrain.models.racnn import RACNN
from finegrain.models.registry import NETWORKS, create_network, network_class, network_config, register_network
from finegrain.models.result import ModelOutput
from finegrain.models.stn import STCNN
from finegrain.models.zoom import ObjectZoom

__all__ = ["NETWORKS", "RACNN", "STCNN", "Classifier", "ModelOutput", "ObjectZoom", "create_network", "network_class",
           "network_config", "register_network"]  # fmt: skip
