"""Model architectures of the components, one module each, loaded from converted component folders."""


def resolve_device(name: str) -> str:
    """`auto` is the accelerator when there is one, else the CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
