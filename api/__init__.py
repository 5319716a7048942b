"""Orchard's HTTP side: OpenAI-compatible `/v1`, `/health`. Runs in uvicorn's thread on rank 0 and talks
to the engine only through `cluster.engine_client.EngineClient`; it never imports MLX."""
