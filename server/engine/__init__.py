"""The engine: scheduling, KV cache, model runner, sampling. Token ids only; no HTTP, no text."""
