"""Capture, the serving form: a causal LM with its KV cache as graph inputs and outputs.

The wrapper gives the graph the decoder signature that Optimum and onnxruntime-genai use:

    input_ids [batch, seq], attention_mask [batch, past+seq], position_ids [batch, seq],
    past_key_values.{i}.key / .value [batch, kv_heads_i, past, head_dim]
        -> logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads_i, past+seq, head_dim]

The past tensors fill a transformers DynamicCache directly (not through ``update``, which
would concatenate them to an empty placeholder), so each layer's present is exactly
``cat(past, new)`` along the sequence axis: the K/V head axis (1) of the past inputs and of
the present outputs are graph *ports* (ir/graph.py) that analysis joins to the K/V heads
of their layer. Batch, sequence and past length are dynamic; the head counts stay static
per layer, which is how onnxruntime-genai reads each layer's width after pruning.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from goa_compiler.capture.experts import experts_as_ffns
from goa_compiler.capture.torch_export import WRAPPER_PREFIX, exportable_experts, max_positions, vocab_size_of

# the graph's interface, by position: three token inputs, then past K/V per layer
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
HEAD_AXIS = 1                       # of every past and present tensor
SEQ_AXIS = 2
# example sizes for tracing: distinct, and above 1, so no size is specialised or unified
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5


class DecoderRefused(Exception):
    """The model cannot be captured as a KV-cache decoder: a one-line reason."""


class CachedDecoder(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, *present), with
    ``past`` a tuple of 2 x layers tensors (key, value of layer 0, then layer 1, ...)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.cache_kw not in params or "position_ids" not in params:
            raise DecoderRefused(f"{type(model).__name__}.forward takes no KV cache and positions")

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if len(cache.layers) * 2 != len(past):
            raise DecoderRefused(f"{len(cache.layers)} cache layers for {len(past)} past tensors")
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            layer.device, layer.dtype, layer.is_initialized = past[2 * i].device, past[2 * i].dtype, True
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: cache})
        present = []
        for layer in cache_of(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_of(out):
    """The cache of a model output: ``cache`` in newer transformers (which warn on the old
    name), ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache geometry: K/V heads and their sizes (key and value may differ)."""

    kv_heads: int
    key_dim: int
    value_dim: int


@dataclass
class CapturedDecoder:
    gm: torch.fx.GraphModule | None      # None: not captured (the compile serves a cached template's graph)
    layers: tuple[LayerCache, ...]
    max_seq: int
    vocab_size: int
    experts: dict[str, int] = field(default_factory=dict)   # parameter -> expert (capture/experts.py)

    @property
    def input_names(self) -> list[str]:
        return [*TOKEN_INPUTS, *(n % i for i in range(len(self.layers)) for n in (PAST_KEY, PAST_VALUE))]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(n % i for i in range(len(self.layers)) for n in (PRESENT_KEY, PRESENT_VALUE))]

    def port_inputs(self) -> dict[int, int]:
        """Input position -> head axis, for every past tensor."""
        return {len(TOKEN_INPUTS) + k: HEAD_AXIS for k in range(2 * len(self.layers))}

    def port_outputs(self) -> dict[int, int]:
        """Output position -> head axis, for every present tensor."""
        return {1 + k: HEAD_AXIS for k in range(2 * len(self.layers))}

    def example(self, layers: tuple[LayerCache, ...] | None = None, past: int = EXAMPLE_PAST,
                seq: int = EXAMPLE_SEQ, batch: int = EXAMPLE_BATCH, seed: int = 0):
        """Inputs of the given cache geometry (the captured one by default)."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab_size, (batch, seq), generator=g)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        tensors = []
        for lc in layers or self.layers:
            tensors.append(torch.randn(batch, lc.kv_heads, past, lc.key_dim, generator=g))
            tensors.append(torch.randn(batch, lc.kv_heads, past, lc.value_dim, generator=g))
        return ids, mask, pos, tuple(tensors)

    def dynamic_shapes(self):
        return decoder_dynamic_shapes(len(self.layers))

    def past_names(self) -> list[str]:
        """The graph's placeholder of every past tensor, in input order."""
        placeholders = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        return placeholders[len(TOKEN_INPUTS):]

    def geometry(self, port_sizes: dict[str, int]) -> tuple[LayerCache, ...]:
        """The cache geometry after a rewrite resized some past ports (rewrite's ``ports``)."""
        names = self.past_names()
        out = []
        for i, lc in enumerate(self.layers):
            k = port_sizes.get(names[2 * i], lc.kv_heads)
            v = port_sizes.get(names[2 * i + 1], lc.kv_heads)
            if k != v:
                raise ValueError(f"layer {i} keeps {k} key heads and {v} value heads")
            out.append(LayerCache(k, lc.key_dim, lc.value_dim))
        return tuple(out)


def decoder_dynamic_shapes(layers: int):
    d = torch.export.Dim.DYNAMIC
    token = {0: d, 1: d}
    return token, dict(token), dict(token), tuple({0: d, SEQ_AXIS: d} for _ in range(2 * layers))


def cache_geometry(model: torch.nn.Module) -> tuple[LayerCache, ...]:
    """Each layer's K/V heads and head sizes, read from one short cached forward (not from
    the config, whose field names differ by family)."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
    except Exception as e:  # noqa: BLE001 - a model that cannot run with a cache, whatever it raises
        raise DecoderRefused(f"{type(model).__name__} does not run with use_cache=True "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from e
    layers = getattr(cache_of(out), "layers", None)
    if not layers:
        raise DecoderRefused(f"{type(model).__name__} returns no per-layer KV cache")
    geo = []
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4 and v.dim() == 4):
            raise DecoderRefused(f"cache layer {type(layer).__name__} is not [batch, heads, seq, dim] keys and values")
        window = getattr(layer, "sliding_window", None)
        if window:
            raise DecoderRefused(f"cache layer {type(layer).__name__} keeps a sliding window of {window} "
                                 f"positions, not every position")
        if k.shape[SEQ_AXIS] != 2:
            raise DecoderRefused(f"cache layer {type(layer).__name__} does not keep every position "
                                 f"(a sliding or compressed cache)")
        geo.append(LayerCache(int(k.shape[HEAD_AXIS]), int(k.shape[-1]), int(v.shape[-1])))
    return tuple(geo)


def decoder_form(model: torch.nn.Module) -> CapturedDecoder:
    """The decoder's interface and cache geometry, without its graph (one short forward);
    DecoderRefused when the model has no KV cache of that form."""
    model.eval()
    exportable_experts(model)
    CachedDecoder(model)                      # refuses a forward without cache and positions
    return CapturedDecoder(None, cache_geometry(model), max_positions(model), vocab_size_of(model))


def serving_form(model: torch.nn.Module, dec: CapturedDecoder) -> str:
    """What decides the decoder's export beside the plain graph's code and weights: its cache
    geometry and interface, the model's class, configuration (attention and experts
    implementation included) and the transformers version. A template keyed by the plain
    graph and this form is the decoder of that model."""
    import transformers

    cfg = getattr(model, "config", None)
    try:
        conf = cfg.to_json_string(use_diff=False) if cfg is not None else ""
    except Exception:  # noqa: BLE001 - a config that does not serialise: its repr still tells it apart
        conf = repr(cfg)
    impl = [getattr(cfg, k, None) for k in ("_attn_implementation", "_experts_implementation")]
    return (f"decoder|{dec.layers}|{dec.input_names}|{dec.output_names}|{type(model).__module__}."
            f"{type(model).__qualname__}|{transformers.__version__}|{impl}|{conf}")


def capture_decoder(model: torch.nn.Module, form: CapturedDecoder | None = None) -> CapturedDecoder:
    """torch.export the model as a KV-cache decoder; DecoderRefused with the reason when the
    model has no cache of that form or torch.export refuses it. ``form``: its
    ``decoder_form``, when the caller has it already."""
    dec = form if form is not None else decoder_form(model)
    wrapper = CachedDecoder(model)
    try:
        with torch.no_grad(), experts_as_ffns(model, WRAPPER_PREFIX) as pieces:
            ep = torch.export.export(wrapper, dec.example(), dynamic_shapes=dec.dynamic_shapes(), strict=False)
    except DecoderRefused:
        raise
    except Exception as e:  # torch.export's errors are many kinds; the first line says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DecoderRefused(f"torch.export of the cached decoder failed: {type(e).__name__}: {first[:200]}") from e
    gm = ep.module()
    # export's input guards pin every past input's head count to the dense model's; the
    # rewrite changes them, and the recapture at export sets new ones
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target) == "_guards_fn":
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    dec.gm = gm
    dec.experts = pieces
    return dec

