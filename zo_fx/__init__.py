"""zo_fx: zeroth-order fine-tuning compiled into one batched forward pass."""

__version__ = "0.1.0"
