"""Model adapters; the plug-in interface they implement is ``mlipd.model_api``."""

from mlipd.model_api import Model, ModelOutput, ModelSpec
from mlipd.models.registry import load_model, names

__all__ = ["Model", "ModelOutput", "ModelSpec", "load_model", "names"]
