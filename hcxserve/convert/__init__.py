"""Split unified HyperCLOVAX-SEED checkpoints into component folders (llm/ ve/ ae/ vd/ ad/) and load them back.

Converting (streams tensor by tensor, writes atomically)::

    from hcxserve.convert import convert
    convert("ckpt/HyperCLOVAX-SEED-Think-32B", "models/think32b", track="a", verify=True)

Loading a component folder in a service::

    from hcxserve.convert import load_state_dict, read_component_config
    cfg = read_component_config("models/think32b/ve")
    vit.load_state_dict(load_state_dict("models/think32b/ve", prefix="vision_model."), strict=True)
"""

from .converter import ConvertResult, convert, format_plan
from .errors import CheckpointError, ComponentError, ConvertError, OutputExistsError, VerifyError
from .loader import iter_tensors, load_state_dict, read_component, read_component_config, read_manifest, weight_map
from .plan import DEFAULT_MAX_SHARD_SIZE, parse_size
from .tables import COMPONENTS, DTYPE_CHOICES, TRACK_COMPONENTS, TRACKS

__all__ = [
    "COMPONENTS",
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPE_CHOICES",
    "TRACKS",
    "TRACK_COMPONENTS",
    "CheckpointError",
    "ComponentError",
    "ConvertError",
    "ConvertResult",
    "OutputExistsError",
    "VerifyError",
    "convert",
    "format_plan",
    "iter_tensors",
    "load_state_dict",
    "parse_size",
    "read_component",
    "read_component_config",
    "read_manifest",
    "weight_map",
]
