"""Ways into jaxllm beyond the LLM class: the OpenAI-compatible server (entrypoints/openai)."""
