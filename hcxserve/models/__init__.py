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


def known_fields(config_class, values: dict | None) -> dict:
    """The entries of a checkpoint's config dict that name a field of `config_class` (a dataclass): the real
    checkpoints' component configs carry other keys (model_type, model_name_or_path, ...) and often no sizes."""
    from dataclasses import fields

    names = {f.name for f in fields(config_class)}
    return {k: v for k, v in (values or {}).items() if k in names}


def state_dict_mismatch(module, tensors: dict) -> dict[str, list[str]]:
    """What keeps `tensors` from loading strictly into `module`: names missing, unexpected, and of the wrong shape
    (each list empty when fine), for errors that name them rather than torch's wall of text."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    return {
        "missing": sorted(set(expected) - set(tensors)),
        "unexpected": sorted(set(tensors) - set(expected)),
        "wrong shape": sorted(
            f"{name} {tuple(tensors[name].shape)} != {expected[name]}"
            for name in set(expected) & set(tensors)
            if tuple(tensors[name].shape) != expected[name]
        ),
    }
