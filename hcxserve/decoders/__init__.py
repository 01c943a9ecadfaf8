"""The decoder processes' work (track B), apart from BentoML: what the LLM drew, turned into files for clients.
The services in `services/` load the models and delegate here."""
