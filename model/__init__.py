"""The Parcae model: config, modules and forward, checkpoint loading, tokenizer, training."""

from parcae_serve.model.loading import builtin_checkpoint

__all__ = ["builtin_checkpoint"]
