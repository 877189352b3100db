"""The attention route hook: every attention call of a Flux transformer handed to a route the caller owns.

`attach(transformer, route, layers)` installs a `RouteProcessor` on the selected attention layers of
a diffusers `FluxTransformer2DModel` (Flux.1 and the reference model share the class). The processor
is diffusers' default `FluxAttnProcessor` (diffusers 0.42) up to the attention kernel: projections,
per-head RMSNorm, text tokens concatenated in front (double blocks), RoPE. There it builds an
`AttentionRecord` (post-RoPE q, k, v [B, S, H, D], text first) and asks the route for the attention
output [B, S, H, D]; then it finishes as the default does (merge heads, output projections, split
for double blocks). `handle.detach()` puts the original processor objects back.

What a processor cannot see it is told: in a single block the sequence is already concatenated, so
the text length, and sigma, step and cfg, come in an `AttentionCall` that the backbone passes to
every routed block through `joint_attention_kwargs` (`FluxAttention.forward` forwards a keyword
only to a processor whose `__call__` declares it, so plain layers never see it). A routed layer
called without one raises: the text length is never guessed.

Layer keys are "double:i" (transformer_blocks.i) and "single:i" (single_transformer_blocks.i): 19 +
38 = 57 layers on Flux.1, 2 + 4 on the reference model. Several routes may be attached to disjoint
layer sets of one transformer; each handle restores only its own layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

LayerKind = Literal["double", "single"]
_PROCESSOR_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor$")
_KIND_OF_BLOCKS = {"transformer_blocks": "double", "single_transformer_blocks": "single"}


@dataclass(frozen=True)
class AttentionCall:
    """What one forward tells its routed attention layers.

    n_text: conditioning tokens in front of the image tokens (the Cond's token count).
    rows, cols: the view's latent token grid (image tokens = rows x cols, raster order).
    sigma: [B] float32 flow time of each batch item (views of one batch may differ).
    step: the sampler's step index, if the caller knows it.
    cfg: the guidance scale (Flux.1-dev's distilled guidance, or a CFG scale), None if there is none.
    view_ids: one id per batch item, if the caller names its views (tiles of an upscale step).
    """

    n_text: int
    rows: int
    cols: int
    sigma: torch.Tensor
    step: int | None = None
    cfg: float | None = None
    view_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_text < 0 or self.rows < 1 or self.cols < 1:
            raise ValueError(f"attention call needs n_text >= 0 and a grid >= 1 x 1, got {self}")
        if self.sigma.ndim != 1:
            raise ValueError(f"attention call sigma must be [B], got shape {tuple(self.sigma.shape)}")
        if self.view_ids is not None and len(self.view_ids) != self.sigma.shape[0]:
            raise ValueError(f"view_ids has {len(self.view_ids)} ids for a batch of {self.sigma.shape[0]}")


@dataclass(frozen=True)
class AttentionRecord:
    """One attention call of one layer, at the attention kernel.

    layer: "double:i" or "single:i".
    q, k, v: [B, S, H, D] post-RoPE (q, k) in the model's dtype, S = n_text + rows x cols, text first.
    mask: the attention mask the block passed (None in Flux's own forward).
    The rest is the forward's AttentionCall.
    """

    layer: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    n_text: int
    rows: int
    cols: int
    sigma: torch.Tensor
    step: int | None
    cfg: float | None
    view_ids: tuple[int, ...] | None


class Route(Protocol):
    """record -> attention output [B, S, H, D] (the layout of diffusers' dispatch_attention_fn)."""

    def __call__(self, record: AttentionRecord) -> torch.Tensor: ...


class RouteProcessor:
    """FluxAttnProcessor with the attention kernel replaced by `route(record)`.

    Not an nn.Module, so that a route's students never become submodules (or state) of the transformer.
    """

    def __init__(self, layer: str, route: Route) -> None:
        self.layer = layer
        self.route = route

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_call: AttentionCall | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_call is None:
            raise ValueError(
                f"layer {self.layer} is routed but the forward passed no AttentionCall "
                "(call the transformer through FluxBackbone.velocity, or pass joint_attention_kwargs="
                "{'attention_call': AttentionCall(...)})"
            )
        query, key, value = _joint_qkv(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        call = attention_call
        if query.shape[1] != call.n_text + call.rows * call.cols or query.shape[0] != call.sigma.shape[0]:
            raise ValueError(
                f"layer {self.layer}: q is {tuple(query.shape)} but the call describes a batch of "
                f"{call.sigma.shape[0]} with {call.n_text} text + {call.rows}x{call.cols} image tokens"
            )
        record = AttentionRecord(
            layer=self.layer,
            q=query,
            k=key,
            v=value,
            mask=attention_mask,
            n_text=call.n_text,
            rows=call.rows,
            cols=call.cols,
            sigma=call.sigma,
            step=call.step,
            cfg=call.cfg,
            view_ids=call.view_ids,
        )
        out = self.route(record)
        if out.shape != query.shape:
            raise ValueError(
                f"route returned {tuple(out.shape)} for layer {self.layer}, expected {tuple(query.shape)}"
            )
        hidden_states = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        n_text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [n_text, hidden_states.shape[1] - n_text], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def _joint_qkv(
    attn: nn.Module, hidden: torch.Tensor, encoder: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projections, per-head RMSNorm and the text-first concatenation, as FluxAttnProcessor: [B, S, H, D]."""
    if attn.fused_projections:
        q, k, v = attn.to_qkv(hidden).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.added_kv_proj_dim is not None:
        if attn.fused_projections:
            eq, ek, ev = attn.to_added_qkv(encoder).chunk(3, dim=-1)
        else:
            eq, ek, ev = attn.add_q_proj(encoder), attn.add_k_proj(encoder), attn.add_v_proj(encoder)
        eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    return q, k, v


def route_kwargs(attn: nn.Module, call: AttentionCall | None) -> dict | None:
    """The joint_attention_kwargs for a block whose attention is `attn`: the call if it is routed."""
    if call is not None and isinstance(attn.processor, RouteProcessor):
        return {"attention_call": call}
    return None


def is_routed(transformer: nn.Module) -> bool:
    """Whether any block's attention of a Flux transformer holds a RouteProcessor (57 checks, no walk)."""
    blocks = (*transformer.transformer_blocks, *transformer.single_transformer_blocks)
    return any(isinstance(block.attn.processor, RouteProcessor) for block in blocks)


def layer_keys(transformer: nn.Module) -> dict[str, str]:
    """{"double:i" / "single:i": processor name} in the transformer's order (doubles, then singles)."""
    keys = {}
    for name in transformer.attn_processors:
        match = _PROCESSOR_NAME.match(name)
        if match is None:
            raise ValueError(f"attention layer {name!r} is not a Flux double or single block's attention")
        keys[f"{_KIND_OF_BLOCKS[match.group(1)]}:{int(match.group(2))}"] = name
    return keys


@dataclass(frozen=True)
class LayerRange:
    """Layers kind:start .. kind:stop-1 (stop None: to the last layer of that kind)."""

    kind: LayerKind
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("double", "single"):
            raise ValueError(f"layer kind must be double or single, got {self.kind!r}")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ValueError(f"layer range {self.kind}:{self.start}..{self.stop} is empty or negative")


@dataclass(frozen=True)
class LayerSet:
    """A selection of attention layers: a union of ranges, resolved against a transformer's layers.

    `LayerSet.parse` reads the string form used in job files: comma-separated items, each "all",
    "double", "single", "double:i", "single:i" or "single:i-j" (i to j inclusive).
    """

    ranges: tuple[LayerRange, ...]

    @classmethod
    def all(cls) -> LayerSet:
        return cls((LayerRange("double"), LayerRange("single")))

    @classmethod
    def parse(cls, spec: str) -> LayerSet:
        ranges: list[LayerRange] = []
        for item in (s.strip() for s in spec.split(",")):
            if item == "all":
                ranges += cls.all().ranges
            elif item in ("double", "single"):
                ranges.append(LayerRange(item))
            elif m := re.fullmatch(r"(double|single):(\d+)(?:-(\d+))?", item):
                start = int(m.group(2))
                stop = int(m.group(3)) + 1 if m.group(3) is not None else start + 1
                ranges.append(LayerRange(m.group(1), start, stop))  # type: ignore[arg-type]
            else:
                raise ValueError(
                    f"layers item {item!r} in {spec!r} is not all, double, single, kind:i or kind:i-j"
                )
        return cls(tuple(ranges))

    def select(self, available: Sequence[str]) -> tuple[str, ...]:
        """The selected keys among `available` ("kind:i"), in its order; an index past the end raises."""
        counts = {kind: sum(key.startswith(f"{kind}:") for key in available) for kind in ("double", "single")}
        for r in self.ranges:
            # An explicit range must lie inside the model; an open one ("single") must not start past it.
            past_end = (
                r.stop > counts[r.kind] if r.stop is not None else 0 < r.start and r.start >= counts[r.kind]
            )
            if past_end:
                raise ValueError(
                    f"layers {r.kind}:{r.start}..{r.stop} but the model has {counts[r.kind]} {r.kind} layers"
                )
        chosen = []
        for key in available:
            kind, index = key.split(":")
            for r in self.ranges:
                stop = r.stop if r.stop is not None else counts[kind]
                if r.kind == kind and r.start <= int(index) < stop:
                    chosen.append(key)
                    break
        return tuple(chosen)


class RouteHandle:
    """Undo for one `attach`: `detach()` restores the original processor objects of its layers."""

    def __init__(
        self, transformer: nn.Module, processors: dict[str, RouteProcessor], originals: dict
    ) -> None:
        self.transformer = transformer
        self.layers = tuple(p.layer for p in processors.values())
        self._processors = processors
        self._originals = originals
        self.attached = True

    def detach(self) -> None:
        """Restore this handle's layers (idempotent); raises if another hand replaced one of them."""
        if not self.attached:
            return
        current = self.transformer.attn_processors
        for name, proc in self._processors.items():
            if current[name] is not proc:
                raise RuntimeError(
                    f"{name} no longer holds this handle's processor: it was replaced elsewhere"
                )
        self.transformer.set_attn_processor({**current, **self._originals})
        self.attached = False

    def __enter__(self) -> RouteHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(transformer: nn.Module, route: Route, layers: LayerSet | None = None) -> RouteHandle:
    """Route the selected attention layers (all by default) of a FluxTransformer2DModel to `route`.

    Each selected layer must hold diffusers' default FluxAttnProcessor on the native attention backend
    without context parallelism: that is the processor RouteProcessor reproduces. Layers already
    routed by another handle are refused.
    """
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    keys = layer_keys(transformer)
    current = transformer.attn_processors
    chosen = (layers or LayerSet.all()).select(list(keys))
    for key in chosen:
        proc = current[keys[key]]
        if isinstance(proc, RouteProcessor):
            raise ValueError(f"layer {key} is already routed: detach its handle first")
        if type(proc) is not FluxAttnProcessor:
            raise ValueError(
                f"layer {key} has processor {type(proc).__name__}; only FluxAttnProcessor can be routed"
            )
        if proc._parallel_config is not None or proc._attention_backend not in (None, "native"):
            raise ValueError(
                f"layer {key} uses attention backend {proc._attention_backend!r} / context parallelism: "
                "routes reproduce only the native backend without context parallelism"
            )
    processors = {keys[key]: RouteProcessor(key, route) for key in chosen}
    originals = {keys[key]: current[keys[key]] for key in chosen}
    transformer.set_attn_processor({**current, **processors})
    return RouteHandle(transformer, processors, originals)
