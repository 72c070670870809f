"""Cost model and capacity planning: FLOPs and bytes moved per component call, pyramid stage, 33-frame
chunk and prompt, counted two independent ways (analytic, and FlopCounterMode over the real modules on
the meta device), with roofline times, frames per second, real-time streams and memory per GPU."""

from .configs import BUILTIN, ModelConfigs, model_configs
from .estimate import CallCost, CostEstimate, estimate, estimate_configs
from .roofline import GPUS, PRECISIONS, Gpu

__all__ = ["BUILTIN", "CallCost", "CostEstimate", "GPUS", "Gpu", "ModelConfigs", "PRECISIONS", "estimate",
           "estimate_configs", "model_configs"]
