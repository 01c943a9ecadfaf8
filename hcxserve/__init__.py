"""Framework-free core of the HyperCLOVAX-SEED BentoML serving stack."""

__version__ = "0.1.0"
