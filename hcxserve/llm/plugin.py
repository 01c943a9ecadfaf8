"""vLLM plugin: precomputed multimodal embeddings for both tracks' LLMs.

Track B: registers `HCXOmniForCausalLM` (`hcxserve/llm/omni.py`). Track A: lets vLLM's HCXVisionV2ForCausalLM
(HyperCLOVAX-SEED-Think-32B) take precomputed image embeddings.

vLLM 0.32 ships the model class but two gaps stop an external vision encoder from feeding it:

1. Its processing info keeps the generic multimodal data parser, which does not know the
   `{"image_embeds", "image_grid_thw"}` dict form, so `image_embeds` requests fail in the API server.
   We give it the Qwen2-VL parser (the vision tower is Qwen2.5-VL) and validate widths against the
   ViT output (`out_hidden_size`, pre-projector) rather than the text hidden size.
2. In embeddings-only mode (`--limit-mm-per-prompt '{"image":0,"video":0}'` + `--enable-mm-embeds`) the
   projector is built inside the same "tower" block as the ViT, so it is dropped with it and the first
   request kills the engine. We put a real projector back; its weights come from the `llm/` component.

It is registered as a `vllm.general_plugins` entry point (pyproject.toml) because vLLM spawns its EngineCore
and workers: a monkeypatch in the parent process would not reach them.

It also keeps an intentional stop quiet: vLLM 0.32's `AsyncLLM.shutdown()` tears the engine down before it cancels
its output handler, and when the handler sees the engine's "dead" marker first it logs an ERROR traceback for a
shutdown that is going fine (vllm-project/vllm#48745; the fix proposed upstream, #49000, is not in 0.32). Once a
shutdown has begun, that one record is logged at DEBUG instead; a real engine death before it still logs its ERROR.
"""

from __future__ import annotations

import functools
import logging
import threading

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_hcxserve_patched"
_HANDLER_FAILED = "AsyncLLM output_handler failed."  # vLLM's message, vllm/v1/engine/async_llm.py
shutdown_started = threading.Event()  # set by AsyncLLM.shutdown: at most one engine per API server process


def register() -> None:
    """Entry point called by vLLM in every process (API server, EngineCore, workers)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models import hyperclovax_vision_v2 as hcx

    # Track B's Omni LLM (lazy: the module imports vLLM internals only when the architecture is used)
    if "HCXOmniForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("HCXOmniForCausalLM", "hcxserve.llm.omni:HCXOmniForCausalLM")

    _quiet_intentional_shutdown()
    if getattr(hcx, _PATCHED_ATTR, False):
        return
    _patch_data_parser(hcx)
    _patch_projector(hcx)
    setattr(hcx, _PATCHED_ATTR, True)
    logger.debug("hcxserve: HCXVisionV2ForCausalLM patched for precomputed image embeddings")


def _patch_data_parser(hcx) -> None:
    from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser

    def get_data_parser(self):
        vision_config = self.get_hf_config().vision_config
        mm_config = self.ctx.model_config.get_multimodal_config()
        # image_embeds are the ViT merger output; vLLM applies the projector afterwards.
        expected = vision_config.out_hidden_size if mm_config.enable_mm_embeds else None
        return Qwen2VLMultiModalDataParser(
            vision_config.spatial_merge_size,
            expected_hidden_size=expected,
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    hcx.HCXVisionV2ProcessingInfo.get_data_parser = get_data_parser


def _patch_projector(hcx) -> None:
    import torch.nn as nn
    from vllm.model_executor.models.utils import StageMissingLayer

    original_init = hcx.HCXVisionV2ForCausalLM.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if isinstance(self.mm_projector, StageMissingLayer):
            vision_config, text_config = self.vision_config, self.text_config
            out_hidden = getattr(vision_config, "out_hidden_size", vision_config.hidden_size)
            self.mm_projector = nn.Linear(out_hidden, text_config.hidden_size)
            self._tower_model_names = [n for n in self._tower_model_names if n != "mm_projector"]

    hcx.HCXVisionV2ForCausalLM.__init__ = __init__


class _ShutdownEngineDead(logging.Filter):
    """Demotes the output handler's EngineDeadError traceback to DEBUG once a shutdown has begun."""

    def filter(self, record: logging.LogRecord) -> bool:
        from vllm.v1.engine.exceptions import EngineDeadError

        if (
            shutdown_started.is_set()
            and record.getMessage() == _HANDLER_FAILED
            and record.exc_info
            and isinstance(record.exc_info[1], EngineDeadError)
        ):
            logger.debug("vLLM's output handler stopped during shutdown: %s", record.exc_info[1])
            return False
        return True


def _quiet_intentional_shutdown() -> None:
    from vllm.v1.engine import async_llm

    if getattr(async_llm.AsyncLLM.shutdown, _PATCHED_ATTR, False):
        return
    original_shutdown = async_llm.AsyncLLM.shutdown

    @functools.wraps(original_shutdown)
    def shutdown(self, *args, **kwargs):
        shutdown_started.set()  # before any teardown, so the handler cannot see the engine gone first
        return original_shutdown(self, *args, **kwargs)

    setattr(shutdown, _PATCHED_ATTR, True)
    async_llm.AsyncLLM.shutdown = shutdown
    async_llm.logger.addFilter(_ShutdownEngineDead())
