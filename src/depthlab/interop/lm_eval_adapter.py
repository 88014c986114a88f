"""A native lm-evaluation-harness model for DepthLM (no export needed).

`DepthLMEval` scores (context, continuation) pairs with the DepthLM forward pass
and the run's own depthlab tokenizer, following HFLM's conventions: left
truncation to `max_seq_len`, an empty context is replaced by the EOS token, the
continuation is scored by summing log-softmax probabilities and `is_greedy` is
whether every continuation token is the argmax. A continuation longer than the
context window (where HFLM stops with an assertion) is scored on its last
`max_seq_len` tokens. It is what `depthlab eval`
uses for models that have no exact stock transformers class (post-LN, Mix-LN,
LayerNorm, ...), and it matches HFLM on exportable models (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from depthlab.errors import DepthlabError

if TYPE_CHECKING:
    from depthlab.model import DepthLM


class DepthLMEval(TemplateLM):
    """lm-eval `LM` over a DepthLM plus a depthlab tokenizer (`encode`, `eos_id`)."""

    backend = "causal"

    def __init__(self, model: DepthLM, tokenizer: Any, batch_size: int = 8,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self.tok = tokenizer
        self._device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(model.cfg.max_seq_len)
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise DepthlabError("the native lm-eval backend needs a tokenizer with an EOS token "
                                "(used as the context of empty-context requests)")
        self._eot = int(eos)

    # ---------------------------------------------------------------- tokenizer
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inps, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ValueError("empty continuation")
                inp = (ctx + cont)[-(self.max_length + 1) :][:-1]
                inps.append(inp)
                conts.append(cont)
            width = max(len(x) for x in inps)
            batch = torch.zeros(len(inps), width, dtype=torch.long)
            for row, inp in enumerate(inps):
                batch[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = self.model(batch.to(self._device)).logits.float()
            logprobs = F.log_softmax(logits, dim=-1)  # stays on the device: [B, T, V] is big
            scores, greedy = [], []
            for row in range(len(idx)):
                n = len(inps[row])
                cont = conts[row][-n:]  # a continuation longer than the context: its tail
                lp = logprobs[row, n - len(cont) : n]
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy.append((lp.argmax(dim=-1) == target).all())
                scores.append(lp.gather(-1, target[:, None]).sum())
            read = torch.stack([torch.stack(scores).double(), torch.stack(greedy).double()]).tolist()
            for i, score, greedy_flag in zip(idx, read[0], read[1], strict=True):
                results[i] = (score, bool(greedy_flag))
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in [req.args for req in requests]:
            windows = [
                (None, *utils.make_disjoint_window(w))
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise DepthlabError("the native backend scores likelihoods only; generation tasks need "
                            "an exportable model (--backend hf)")
