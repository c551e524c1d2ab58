"""The OpenAI-compatible API under /v1: routes, request and response models, API keys."""
