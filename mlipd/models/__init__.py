"""Model adapters and the plug-in interface (see ``base``)."""

from mlipd.model_api import Model, ModelOutput, ModelSpec
from mlipd.models.registry import load_model, names

__all__ = ["Model", "ModelOutput", "ModelSpec", "load_model", "names"]
