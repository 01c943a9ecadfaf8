"""Model architectures of the components, one module each, loaded from converted component folders."""


def resolve_device(name: str) -> str:
    """`auto` is the accelerator when there is one, else the CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str):
    """The torch dtype a config names (`bfloat16`, `float16`, `float32`)."""
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, not {name!r}")
    return dtypes[name]
