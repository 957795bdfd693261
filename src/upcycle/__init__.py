"""upcycle: fine-tune experts along a trajectory, then merge them or upcycle them into MoE layers."""

__version__ = "0.1.0"
