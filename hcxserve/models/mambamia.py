"""MambaMia, the video-audio compressor of HyperCLOVAX-SEED-Omni-8B, in pure torch (CPU and CUDA).

It turns the 25-Hz continuous audio features of a video's sound track (`[T, llm_hidden]`, the audio projector's
output) into one token per second (`[ceil(T / 25), llm_hidden]`). The original is OmniServe's
`encoder/audio/track_b/app/model/mambamia_videoaudio_compressor.py` (`MambaMiaVideoAudioCompressor`), whose
Mamba2 mixer only runs the fused `mamba_ssm` Triton kernel (`mamba_split_conv1d_scan_combined`) and asserts CUDA.
Here the same computation is written out in torch:

1. pad T with zero rows to a multiple of `chunk_size` (25), then `input_proj` (Linear, with bias);
2. append the learnable `query_token` after every 25-frame chunk (26 positions per chunk) and apply `input_norm`
   (LayerNorm, eps 1e-6);
3. `model`: `num_hidden_layers` pre-norm blocks, each RMSNorm -> "gated pooling attention" (the query position of
   every chunk is mixed with a softmax-weighted average of the chunk's 25 normed frames; weights from `weight_fc`,
   mix ratio from `gate_fc`, clamped to [0.01, 0.99]) -> Mamba2 mixer -> + residual; then `norm_f` (RMSNorm);
4. keep the query positions and apply `output_proj` (Linear, with bias).

The mixer is the fused kernel's math: in_proj -> split (z, xBC, dt) -> depthwise causal conv1d + SiLU on xBC ->
split (x, B, C) -> SSD scan with dt = softplus(dt + dt_bias), A = -exp(A_log), skip D -> gated RMSNorm with
`norm_before_gate=True` (normalise y per group, then multiply by silu(z); transformers' Mamba2 uses the other
order) -> out_proj. The scan is done chunk by chunk (`ssm_chunk_size`, 256) with the state carried between chunks,
so memory stays bounded for hours of audio; it computes in fp32 whatever the parameter dtype.

Everything is causal: a chunk's output token depends only on that chunk and earlier ones.

Weights come from a converted `ae/` folder, where the unified checkpoint's `model.video_audio_compressor.*`
tensors sit under `video_audio_compressor.*`; the folder may have none (the compressor is optional).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hcxserve.convert.errors import ComponentError, few
from hcxserve.models import known_fields, state_dict_mismatch

logger = logging.getLogger(__name__)

WEIGHT_PREFIX = "video_audio_compressor."  # in ae/ (the unified checkpoint has "model." in front)
CONFIG_KEY = "video_audio_compressor_config"
TYPE_KEY = "video_audio_compressor_type"
COMPRESSOR_TYPE = "mambamia"
# The GPA mix ratio is squeezed into [eps, 1 - eps] so neither the query nor the pooled frames are ever dropped.
_GATE_EPSILON = 0.01


@dataclass(frozen=True)
class MambaMiaConfig:
    """Every size of the compressor; the defaults are the released Omni-8B one.

    The first five fields are the original's `MambaMiaVideoAudioCompressorConfig`; the rest are the Mamba2 settings
    it hard-codes (head_dim 64, num_heads = expand * hidden_size / 64, n_groups 1, SSM chunk 256) or inherits from
    its `MambaMia2Config` defaults (state 128, conv 4, eps 1e-5, no in/out-proj bias, conv bias, norm before gate).
    """

    input_size: int = 4096
    output_size: int = 4096
    chunk_size: int = 25  # audio frames pooled into one output token (1 s at 25 Hz)
    num_hidden_layers: int = 1
    hidden_size: int = 3072
    num_heads: int = 96
    head_dim: int = 64
    state_size: int = 128
    n_groups: int = 1
    expand: int = 2
    conv_kernel: int = 4
    ssm_chunk_size: int = 256  # block length of the SSD scan; changes rounding only, never the result
    layer_norm_epsilon: float = 1e-5  # the RMSNorms of the blocks, norm_f and the mixer's gated norm
    input_norm_epsilon: float = 1e-6
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_before_gate: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)

    def __post_init__(self) -> None:
        positive = ("input_size", "output_size", "chunk_size", "num_hidden_layers", "hidden_size", "num_heads")
        positive += ("head_dim", "state_size", "n_groups", "expand", "conv_kernel", "ssm_chunk_size")
        bad = [name for name in positive if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if bad:
            raise ValueError(f"must be positive integers: {', '.join(bad)}")
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ValueError(
                f"num_heads {self.num_heads} x head_dim {self.head_dim} != expand {self.expand} x hidden_size "
                f"{self.hidden_size}"
            )
        if self.num_heads % self.n_groups or self.intermediate_size % self.n_groups:
            raise ValueError(f"n_groups {self.n_groups} must divide num_heads {self.num_heads}")
        object.__setattr__(self, "time_step_limit", tuple(float(v) for v in self.time_step_limit))

    @classmethod
    def from_dict(cls, config: dict) -> MambaMiaConfig:
        """Defaults overridden by the keys of `video_audio_compressor_config` that name a field; others are ignored.

        As in the original, num_heads follows hidden_size (expand * hidden_size / head_dim) unless it is given,
        so a config that only names hidden_size (as the original's does) gets a consistent head count.
        """
        known = known_fields(cls, config)
        if "num_heads" not in known:
            sizes = cls.__dataclass_fields__
            expand = known.get("expand", sizes["expand"].default)
            hidden = known.get("hidden_size", sizes["hidden_size"].default)
            head_dim = known.get("head_dim", sizes["head_dim"].default)
            if isinstance(expand, int) and isinstance(hidden, int) and isinstance(head_dim, int) and head_dim > 0:
                known["num_heads"] = expand * hidden // head_dim
        return cls(**known)

    @classmethod
    def from_component_config(cls, component_config: dict, *, where: str) -> MambaMiaConfig:
        """The sizes an `ae/config.json` gives: its `video_audio_compressor_config` (missing keys take the real
        defaults), input and output sizes falling back to `text_hidden_size`, which is what the original passes."""
        kind = component_config.get(TYPE_KEY, COMPRESSOR_TYPE)
        if kind != COMPRESSOR_TYPE:
            raise ComponentError(f"{where}: {TYPE_KEY} {kind!r} is not supported (only 'mambamia')")
        raw = component_config.get(CONFIG_KEY) or {}
        if not isinstance(raw, dict):
            raise ComponentError(f"{where}: {CONFIG_KEY} is not an object")
        raw = dict(raw)
        text_hidden = component_config.get("text_hidden_size")
        if isinstance(text_hidden, int):
            raw.setdefault("input_size", text_hidden)
            raw.setdefault("output_size", text_hidden)
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise ComponentError(f"{where}: {CONFIG_KEY}: {exc}") from exc

    def to_dict(self) -> dict:
        values = asdict(self)
        values["time_step_limit"] = list(self.time_step_limit)
        return values

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size


class _RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (the order of the original's norms)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _GatedRMSNorm(nn.Module):
    """The fused kernel's gated RMSNorm: per-group RMS over `group_size` channels, gate silu(z) after or before."""

    def __init__(self, size: int, eps: float, group_size: int, norm_before_gate: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y, gate = y.float(), F.silu(z.float())
        if not self.norm_before_gate:
            y = y * gate
        grouped = y.unflatten(-1, (-1, self.group_size))
        y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        y = y * self.weight.float()
        return y * gate if self.norm_before_gate else y


def ssd_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """The Mamba2 selective scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, without D.

    x [b, l, h, p], dt [b, l, h] (already softplus'd), A [h] (negative), B and C [b, l, g, n]; returns y like x,
    in fp32. Within a block of `chunk_size` steps the scan is the quadratic "attention" form (decays from a
    cumulative sum, as the Triton kernel does); between blocks the [b, h, p, n] state is carried in a loop, so
    memory is O(chunk_size^2) per head whatever the length.
    """
    batch, length, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    x, dt, A = x.float(), dt.float(), A.float()
    # Each group's B and C serve heads // groups consecutive heads (the kernel's layout).
    B = B.float().repeat_interleave(heads // groups, dim=2)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    h = x.new_zeros(batch, heads, head_dim, state)
    outputs = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        xc, Bc, Cc = x[:, start:end], B[:, start:end], C[:, start:end]
        xdt = xc * dt[:, start:end, :, None]  # [b, q, h, p]
        log_decay = torch.cumsum(dt[:, start:end] * A, dim=1).transpose(1, 2)  # [b, h, q]
        # decay[i, j] = exp(sum of dt*A over j+1..i) for j <= i; masked before exp so the upper part cannot overflow.
        diff = log_decay[:, :, :, None] - log_decay[:, :, None, :]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal, -math.inf))
        scores = torch.einsum("bihn,bjhn->bhij", Cc, Bc) * decay
        y = torch.einsum("bhij,bjhp->bihp", scores, xdt)
        # The state entering the block, decayed up to each position.
        y = y + torch.einsum("bihn,bhpn->bihp", Cc, h) * torch.exp(log_decay).transpose(1, 2)[..., None]
        outputs.append(y)
        to_end = torch.exp(log_decay[:, :, -1:] - log_decay).transpose(1, 2)  # [b, q, h]
        h = h * torch.exp(log_decay[:, :, -1])[..., None, None]
        h = h + torch.einsum("bjhn,bjhp->bhpn", Bc * to_end[..., None], xdt)
    return torch.cat(outputs, dim=1)


class MambaMiaMixer(nn.Module):
    """The Mamba2 mixer of a MambaMia block (the original's `MambaMia2Mixer`), with the checkpoint's names."""

    def __init__(self, config: MambaMiaConfig) -> None:
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(
            config.hidden_size, config.intermediate_size + config.conv_dim + config.num_heads, bias=config.use_bias
        )
        # Depthwise; padding is applied on the left in forward so the conv is causal without trimming.
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, config.conv_kernel, groups=config.conv_dim, bias=config.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(config.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, config.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(config.num_heads))
        self.norm = _GatedRMSNorm(
            config.intermediate_size,
            config.layer_norm_epsilon,
            config.intermediate_size // config.n_groups,
            config.norm_before_gate,
        )
        self.out_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        z, xBC, dt = self.in_proj(hidden_states).split([cfg.intermediate_size, cfg.conv_dim, cfg.num_heads], dim=-1)
        xBC = F.pad(xBC.transpose(1, 2), (cfg.conv_kernel - 1, 0))
        xBC = F.silu(self.conv1d(xBC)).transpose(1, 2)
        x, B, C = xBC.split([cfg.intermediate_size, cfg.n_groups * cfg.state_size, cfg.n_groups * cfg.state_size], -1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        low, high = cfg.time_step_limit
        if (low, high) != (0.0, math.inf):
            dt = dt.clamp(low, high)
        A = -torch.exp(self.A_log.float())
        x = x.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        y = ssd_scan(
            x,
            dt,
            A,
            B.reshape(batch, length, cfg.n_groups, cfg.state_size),
            C.reshape(batch, length, cfg.n_groups, cfg.state_size),
            cfg.ssm_chunk_size,
        )
        y = y + x.float() * self.D.float()[:, None]
        y = self.norm(y.flatten(2), z)
        return self.out_proj(y.to(dtype))


class MambaMiaBlock(nn.Module):
    """Pre-norm residual block: RMSNorm -> gated pooling attention on the query positions -> mixer -> + input."""

    def __init__(self, config: MambaMiaConfig) -> None:
        super().__init__()
        self.chunk_size = config.chunk_size
        self.norm = _RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MambaMiaMixer(config)
        self.weight_fc = nn.Linear(config.hidden_size, config.chunk_size)  # one score per frame of the chunk
        self.gate_fc = nn.Linear(config.hidden_size, 1)  # query vs pooled-frames ratio

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        dtype = hidden_states.dtype
        normed = self.norm(hidden_states.to(self.norm.weight.dtype))
        batch, length, width = normed.shape
        per_chunk = self.chunk_size + 1
        if length % per_chunk:
            raise ValueError(f"sequence length {length} is not a multiple of chunk_size + 1 = {per_chunk}")
        chunks = normed.view(batch, length // per_chunk, per_chunk, width)
        frames, queries = chunks[:, :, : self.chunk_size], chunks[:, :, self.chunk_size]
        # Softmax and sigmoid in fp32, cast back to the activations' dtype, as the original does.
        alpha = torch.softmax(self.weight_fc(queries).float(), dim=-1).to(dtype)
        pooled = (frames * alpha.unsqueeze(-1)).sum(dim=2)
        gate = torch.sigmoid(self.gate_fc(queries).float()).to(dtype)
        gate = gate * (1 - 2 * _GATE_EPSILON) + _GATE_EPSILON
        queries = queries * (1 - gate) + pooled * gate
        chunks = torch.cat([frames, queries.unsqueeze(2)], dim=2)
        return self.mixer(chunks.view(batch, length, width)) + residual


class _Backbone(nn.Module):
    """The original's `MambaMia2Model` (no embedding table: it takes the projected features)."""

    def __init__(self, config: MambaMiaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MambaMiaBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_f = _RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm_f(hidden_states)


class MambaMiaCompressor(nn.Module):
    """`forward(x [T, input_size]) -> [ceil(T / chunk_size), output_size]`; also `[batch, T, input_size]`."""

    def __init__(self, config: MambaMiaConfig | None = None) -> None:
        super().__init__()
        config = config or MambaMiaConfig()
        self.config = config
        self.input_proj = nn.Linear(config.input_size, config.hidden_size)
        self.query_token = nn.Parameter(torch.zeros(config.hidden_size))
        self.model = _Backbone(config)
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.input_norm_epsilon)
        self.output_proj = nn.Linear(config.hidden_size, config.output_size)

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def num_tokens(self, num_frames: int) -> int:
        """Output tokens for an input of num_frames: one per started chunk (the last one is zero-padded)."""
        return -(-num_frames // self.config.chunk_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        unbatched = features.dim() == 2
        if unbatched:
            features = features.unsqueeze(0)
        if features.dim() != 3 or features.shape[-1] != self.config.input_size:
            raise ValueError(f"expected [T, {self.config.input_size}] or [batch, T, {self.config.input_size}] features")
        batch, length, _ = features.shape
        if length == 0:
            raise ValueError("cannot compress an empty sequence")
        chunk, width = self.config.chunk_size, self.config.hidden_size
        features = features.to(self.input_proj.weight.dtype)
        # Zero rows before input_proj, so padded frames become input_proj.bias, as in the original.
        features = F.pad(features, (0, 0, 0, -length % chunk))
        n_chunks = features.shape[1] // chunk
        hidden = self.input_proj(features).view(batch, n_chunks, chunk, width)
        query = self.query_token.to(hidden.dtype).expand(batch, n_chunks, 1, width)
        hidden = self.input_norm(torch.cat([hidden, query], dim=2).view(batch, n_chunks * (chunk + 1), width))
        hidden = self.model(hidden)
        # The original zeroes NaNs here (defensively); kept so outputs match it even on pathological inputs.
        hidden = torch.nan_to_num(hidden, nan=0.0)
        out = self.output_proj(hidden.view(batch, n_chunks, chunk + 1, width)[:, :, chunk])
        return out[0] if unbatched else out

    @classmethod
    def from_pretrained(
        cls, ae_dir: str | Path, *, device: str = "cpu", dtype: str = "float32"
    ) -> MambaMiaCompressor | None:
        """The compressor of a converted `ae/` folder, or None when the folder holds no `video_audio_compressor.*`.

        Sizes come from `config.json:video_audio_compressor_config` (missing keys take the real defaults;
        input/output sizes fall back to `text_hidden_size`, which is what the original passes); the weights must
        match the module exactly, or a ComponentError names the missing, unexpected or mis-shaped tensors.
        """
        from hcxserve.convert import load_state_dict, read_component_config, weight_map
        from hcxserve.models import resolve_device, torch_dtype

        ae_dir = Path(ae_dir)
        weights_dtype = torch_dtype(dtype)  # a bad name fails before any file is read
        if not any(name.startswith(WEIGHT_PREFIX) for name in weight_map(ae_dir)):
            return None
        config = MambaMiaConfig.from_component_config(read_component_config(ae_dir), where=f"{ae_dir}/config.json")
        tensors = load_state_dict(ae_dir, prefix=WEIGHT_PREFIX)

        with torch.device("meta"):  # every parameter is replaced by the load
            model = cls(config)
        check_weights(model, tensors, where=str(ae_dir))
        model.load_state_dict(tensors, strict=True, assign=True)
        device = resolve_device(device)
        model = model.to(device=device, dtype=weights_dtype).eval()
        logger.info(
            "MambaMia compressor loaded from %s on %s (%s, %d params, %d layer(s), hidden %d)",
            ae_dir,
            device,
            dtype,
            sum(p.numel() for p in model.parameters()),
            config.num_hidden_layers,
            config.hidden_size,
        )
        return model


def check_weights(model: nn.Module, tensors: dict[str, torch.Tensor], *, where: str) -> None:
    """Raise a ComponentError naming every missing, unexpected or mis-shaped tensor (strict loading, but readable)."""
    problems = [f"{label} {few(items)}" for label, items in state_dict_mismatch(model, tensors).items() if items]
    if problems:
        raise ComponentError(f"{where}: {WEIGHT_PREFIX}* does not match the MambaMia config: " + "; ".join(problems))


def tiny_config(llm_hidden_size: int = 576) -> dict:
    """A small compressor config (hidden 128: 4 heads of 64, state 16, one layer) for CPU tests."""
    return {
        "input_size": llm_hidden_size,
        "output_size": llm_hidden_size,
        "chunk_size": 25,
        "num_hidden_layers": 1,
        "hidden_size": 128,
        "num_heads": 4,
        "head_dim": 64,
        "state_size": 16,
    }


def tiny_components(seed: int = 0, llm_hidden_size: int = 576) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config entries, tensors named as in a unified Omni checkpoint, `model.video_audio_compressor.*`).

    Values come from one seeded CPU generator in sorted name order, so they are the same everywhere. The SSM
    parameters get the Mamba2 initialisation (A = -1..-heads, dt in [1e-3, 0.1], D = 1), norms start as the
    identity, and linear layers are scaled by 1/sqrt(fan_in) so activations stay of order one.
    """
    config_entries = {CONFIG_KEY: tiny_config(llm_hidden_size), TYPE_KEY: COMPRESSOR_TYPE}
    sizes = MambaMiaConfig.from_dict(config_entries[CONFIG_KEY])
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in MambaMiaCompressor(sizes).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _tiny_init(name, shapes[name], generator) for name in sorted(shapes)}
    return config_entries, {f"model.{WEIGHT_PREFIX}{name}": tensor for name, tensor in tensors.items()}


def _tiny_init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "A_log":
        return torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
    if leaf == "D":
        return torch.ones(shape)
    if leaf == "dt_bias":  # inverse softplus of dt log-uniform in [1e-3, 0.1]
        dt = torch.exp(torch.rand(shape, generator=generator) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))
    if "norm" in name:  # RMSNorm / LayerNorm start as the identity
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if name == "query_token":
        return torch.randn(shape, generator=generator)
    if len(shape) == 1:  # biases
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / fan_in**0.5
