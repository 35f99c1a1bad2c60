"""The OpenAI-compatible server: protocol (pydantic bodies), serving_completion / serving_chat
(requests -> AsyncEngine -> responses), metrics (Prometheus), api_server (the FastAPI app), cli
(`jaxllm serve`), bench_serve (a client at Poisson rates). Host only: never imports jax itself."""
