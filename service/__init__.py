"""The online service: FastAPI over a vLLM (or transformers) engine, with a Redis id store."""
