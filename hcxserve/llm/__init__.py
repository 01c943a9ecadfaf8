"""The LLM component: vLLM's command line for a track, and the vLLM plugin that loads in every vLLM process."""
