"""Model components run by our own services (vLLM runs the LLM)."""
