"""Mixture-of-experts layers built from LoRA experts, with top-k routers."""

from upcycle.moe.layer import (
    LoraMoELinear,
    Routing,
    load_balancing_loss,
    router_statistics,
)
from upcycle.moe.upcycle import (
    collect_router_statistics,
    moe_layers,
    router_parameters,
    total_load_balancing_loss,
    train_router,
    trainable_moe_parameters,
    upcycle_to_moe,
)

__all__ = [
    "LoraMoELinear",
    "Routing",
    "collect_router_statistics",
    "load_balancing_loss",
    "moe_layers",
    "router_parameters",
    "router_statistics",
    "total_load_balancing_loss",
    "train_router",
    "trainable_moe_parameters",
    "upcycle_to_moe",
]
