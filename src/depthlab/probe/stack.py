"""LayerStack: any causal LM seen as a stack of residual blocks.

    h_0 = embed(ids);  h_{l+1} = block_l(h_l);  logits = head(final_norm(h_L))

Every hidden state is the residual stream *before* the final norm (also h_L).
Metric code is written once against this class; per-architecture details
(rotary tables, causal masks, block call signatures, embedding scales, fused
weights) live in adapters (`depthlab.probe.adapters`), which subclass
`LayerStack` and implement the hooks marked "adapter" below.

Running a plan (`run`) is how skipping, swapping, repeating or replacing blocks
is expressed: position `start + i` applies `plan[i]`, which is a block index (the
original module of that block), `None` (identity: `h_{l+1} = h_l`) or a callable
`h -> h`. Indices never shift: a plan always has `L - start` entries.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depthlab.errors import DepthlabError

PlanEntry = int | None | Callable[[Tensor], Tensor]


@dataclass
class MoERouterInfo:
    """How block `l` routes tokens.

    `router`'s forward INPUT (first positional argument, any leading shape
    flattened to [tokens, d]) is exactly what is routed; its output (element
    `logits_at` if a tuple) is the router logits [tokens, num_experts].
    """

    router: nn.Module
    top_k: int
    num_experts: int
    renormalize: bool
    mlp: nn.Module
    """The whole sparse MLP (input = what is routed, output = branch update)."""
    scoring: str = "softmax"
    """Expert scores from the logits: "softmax" over all experts, or "sigmoid" of each
    (DeepSeek-V3-style routers), which router entropy normalises to sum to 1."""
    logits_at: int = 0
    """Where the logits are in the router's tuple output (Llama 4's router returns
    (scores, logits))."""


def _forward_ad(h: Tensor) -> bool:
    """Whether h is being differentiated in forward mode (torch.func or forward_ad)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(h):
        return True
    return torch.autograd.forward_ad.unpack_dual(h).tangent is not None


class LayerStack:
    """A causal LM seen as h0 = embed(ids); h_{l+1} = block_l(h_l); logits = head(final_norm(h_L)).

    Subclasses (adapters) implement: `_embed`, `_run_block`, `final_norm`, `head`,
    `branch_modules`, `block_module`, and optionally `attention_probs`, `moe_router`,
    `weight_matrices` (the defaults return None / the block's 2-D parameters).
    """

    arch: str = "generic"
    branch_scale: float = 1.0
    """What a block multiplies each branch output by before the residual add (1, except
    Granite's residual_multiplier)."""

    def __init__(
        self,
        model: nn.Module,
        n_layers: int,
        d_model: int,
        *,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        self.max_seq_len = max_seq_len
        first = next(iter(model.parameters()), None)
        self.model_dtype: torch.dtype = first.dtype if first is not None else torch.float32
        """The dtype the model was given in (report this); `compute_dtype` is what runs."""
        if device is not None:
            model.to(torch.device(device))
        if dtype is not None:
            model.to(dtype)
        model.eval()
        first = next(iter(model.parameters()), None)
        self.device: torch.device = first.device if first is not None else torch.device("cpu")

    # ------------------------------------------------------------------ dtype
    @property
    def compute_dtype(self) -> torch.dtype:
        first = next(iter(self.model.parameters()), None)
        return first.dtype if first is not None else torch.float32

    def to_float32(self) -> LayerStack:
        """Cast the wrapped model to fp32 in place (`model_dtype` keeps the original)."""
        self.model.float()
        return self

    # ------------------------------------------------------------- adapter hooks
    def embed(self, ids: Tensor) -> Tensor:
        """[N, T] token ids -> h_0 [N, T, d] (including any embedding scale / positions)."""
        return self._embed(self._ids(ids))

    def _embed(self, ids: Tensor) -> Tensor:
        """Adapter: embed validated ids (long, on the stack's device)."""
        raise NotImplementedError

    def run_block(self, l: int, h: Tensor) -> Tensor:  # noqa: E741
        """Apply the ORIGINAL block `l` to residual stream h [N, T, d] (positions 0..T-1).

        Works under no_grad, autograd and forward-mode AD (`torch.func.jvp`,
        `torch.autograd.forward_ad`): when h carries a tangent, SDPA is restricted
        to its math backend (the fused CPU/GPU kernels have no forward-AD formula).
        """
        l = self.block_index(l)  # noqa: E741
        if _forward_ad(h):
            with self._forward_ad_context():
                return self._run_block(l, h)
        return self._run_block(l, h)

    @contextlib.contextmanager
    def _forward_ad_context(self) -> Iterator[None]:
        """Kernels with forward-AD formulas: SDPA's math backend (adapters may add more)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            yield

    def _run_block(self, l: int, h: Tensor) -> Tensor:  # noqa: E741
        """Adapter: apply block l (index already validated)."""
        raise NotImplementedError

    def final_norm(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        """Normed residual -> logits (including any final logit softcap)."""
        raise NotImplementedError

    def branch_modules(self, l: int) -> dict[str, nn.Module]:  # noqa: E741
        """{"attn": m, "mlp": m}: each module's forward output (first element if a
        tuple), times `branch_scale`, is that branch's update before the residual add."""
        raise NotImplementedError

    def attention_probs(self, l: int, h: Tensor) -> Tensor | None:  # noqa: E741
        """Causal attention weights [N, heads, T, T] (fp32) of block l for input residual h."""
        return None

    def moe_router(self, l: int) -> MoERouterInfo | None:  # noqa: E741
        return None

    def weight_matrices(self, l: int) -> dict[str, Tensor]:  # noqa: E741
        """Named 2-D (or stacked 3-D expert) weights of block l, e.g. "attn.q_proj",
        "mlp.down_proj", "experts.up_proj"; Linear convention [out, in]."""
        return {
            name.removesuffix(".weight"): p.detach()
            for name, p in self.block_module(l).named_parameters()
            if p.ndim >= 2
        }

    def block_module(self, l: int) -> nn.Module:  # noqa: E741
        """The nn.Module of block l (for hooks); adapters override."""
        raise NotImplementedError

    # ---------------------------------------------------------------- generic
    def block_index(self, l: int) -> int:  # noqa: E741
        """`l` as a block index, or one line saying why it is none (not an integer, or out
        of range)."""
        # numpy / torch integers are indices; True/False (a keep/skip mask) and 1.7 are not
        # (int() would silently make them blocks 1, 0 and 1)
        try:
            if isinstance(l, bool) or str(getattr(l, "dtype", "")) in ("bool", "torch.bool"):
                raise TypeError
            l = operator.index(l)  # noqa: E741
        except TypeError:
            raise DepthlabError(f"block index must be an int, got {l!r} ({type(l).__name__}); "
                                "a plan lists block indices (or None to skip), not a mask"
                                ) from None
        if not 0 <= l < self.n_layers:
            raise DepthlabError(f"block index {l} out of range for a {self.n_layers}-layer model")
        return l

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size: the rows of its input embedding (what a lookup
        indexes), else its config's."""
        model = self.model
        try:
            return int(model.get_input_embeddings().num_embeddings)
        except Exception:  # noqa: BLE001  (no HF-style accessor: the config says)
            pass
        for attr in ("cfg", "config"):
            v = getattr(getattr(model, attr, None), "vocab_size", None)
            if isinstance(v, int):
                return v
        return None

    def check_ids(self, ids: object) -> Tensor:
        """[N, T] (or [T]) integer token ids within the vocabulary and the context, as a
        long tensor where they were; else one line saying what is wrong (an embedding lookup
        fails deep in torch on CPU, with a device assert on CUDA, and float ids would be
        truncated silently)."""
        if ids is None:
            raise DepthlabError("token ids are required: an [N, T] tensor of integers")
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DepthlabError(f"token ids must be an [N, T] tensor of integers ({err})") from None
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2:
            raise DepthlabError(f"token ids must have shape [N, T], got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise DepthlabError(f"token ids must be integers, got dtype {ids.dtype}")
        if self.max_seq_len is not None and ids.shape[1] > self.max_seq_len:
            raise DepthlabError(
                f"sequence length {ids.shape[1]} exceeds the model's max_seq_len {self.max_seq_len}"
            )
        ids = ids.long()  # uint16/uint32 token files have no min/max in torch
        if ids.numel():
            low, high = (int(x) for x in torch.aminmax(ids))  # one read from the device
            vocab = self.vocab_size
            if low < 0:
                raise DepthlabError(f"token ids must be >= 0, got {low}")
            if vocab is not None and high >= vocab:
                raise DepthlabError(f"token ids go up to {high}, beyond the model's vocabulary "
                                    f"({vocab})")
        return ids

    def _ids(self, ids: Tensor) -> Tensor:
        return self.check_ids(ids).to(self.device)

    def logits(self, h_L: Tensor) -> Tensor:
        return self.head(self.final_norm(h_L))

    @torch.no_grad()
    def hidden_states(self, ids: Tensor) -> list[Tensor]:
        """[h_0, ..., h_L], all pre-final-norm residual streams, no grad."""
        h = self.embed(ids)
        states = [h]
        for l in range(self.n_layers):  # noqa: E741
            h = self.run_block(l, h)
            states.append(h)
        return states

    def run(self, h: Tensor, start: int, plan: Sequence[PlanEntry] | None = None) -> Tensor:
        """Apply positions start..L-1 to h_start and return h_L.

        plan[i] for position start+i: an int (index of the block module applied
        there), None (identity/skip) or a callable h -> h. None = original blocks.
        """
        if not 0 <= start <= self.n_layers:
            raise DepthlabError(f"start {start} out of range 0..{self.n_layers}")
        if plan is None:
            plan = list(range(start, self.n_layers))
        plan = list(plan)
        if len(plan) != self.n_layers - start:
            raise DepthlabError(
                f"plan has {len(plan)} entries, expected {self.n_layers - start} "
                f"(positions {start}..{self.n_layers - 1})"
            )
        for entry in plan:
            if entry is None:
                continue
            if isinstance(entry, nn.Module) or (callable(entry) and not isinstance(entry, int)):
                h = entry(h)
            else:
                h = self.run_block(self.block_index(entry), h)
        return h

    def loss(self, h_L: Tensor, ids: Tensor) -> Tensor:
        """Token-mean next-token cross-entropy over N*(T-1) tokens, fp32. (The ids are
        the ones `h_L` was embedded from, checked there: not again per plan.)"""
        ids = torch.as_tensor(ids)
        ids = (ids.unsqueeze(0) if ids.ndim == 1 else ids).to(self.device, torch.long)
        logits = self.logits(h_L)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(arch={self.arch!r}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, model_dtype={self.model_dtype}, device={self.device})"
        )
