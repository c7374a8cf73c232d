"""The only code of fp8-backend that imports vLLM."""
