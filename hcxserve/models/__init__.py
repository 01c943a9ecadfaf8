"""Model architectures of the components, one module each, loaded from converted component folders."""


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next batch instead of handing it back to the kernel.

    By default glibc maps every block over 32 MiB on its own and unmaps it when freed, and trims the heap's top: a
    batch's pixel tensors, mel features, waveforms and CPU activations are new pages every time, each faulting in
    on first touch (a 38 MB concatenation took 12 ms, 2 ms into pages already mapped). Kept, on a 2-core CPU, a
    batch ran 1.26-1.34x faster for the vision encoders, 1.72x for the audio encoder and 1.85x for the audio
    decoder (benchmarks/bench_freed_memory.py). The cost: the process's RSS stays at its high-water mark, one batch's
    worth above the model. False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def apply_process_settings(cfg) -> None:
    """A torch component's settings for its whole process (a TorchComponentConfig), applied once its model is
    loaded (so that loading's temporary copies go back to the kernel): torch's intra-op threads on a CPU, and
    freed memory kept for the next batch."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.keep_freed_memory:
        keep_freed_memory()


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
