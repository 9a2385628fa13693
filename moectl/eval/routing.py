"""Routing analysis: how a model routed the tokens of an evaluation, per layer and across layers.

`RoutingAnalysis` is an observer (`MoETransformer.forward(..., mode=RoutingMode(observer=analysis))`):
every routed layer hands it its decisions (`moectl.core.moe.RouteObservation`) and it keeps running sums, so
memory does not grow with the number of tokens except for the two medians (inner and outer
balance) and the first `mi_tokens` tokens of the binned mutual information. `result(tokenizer)`
gives the report that `moectl eval` prints and writes; docs/eval.md defines every measure.

Layers are aligned by forward: the first routed layer of a forward (index 0) starts a new one,
so cross-layer measures compare the same tokens in every layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from moectl.core.moe import RouteObservation
from moectl.core.stats import layer_summary

HIST_BINS = 20          # router-entropy histogram: equal bins on [0, ln E]
MI_BINS = 100           # the RMoE paper's digitisation of routing probabilities on [0, 1]
MI_TOKENS = 2048        # tokens the binned mutual information uses (it costs T * E^2 per layer pair)
PREFERRED = 8           # tokens listed per expert
PREFERRED_MIN_COUNT = 5  # occurrences a token needs before its preference counts


def selected_mask(ids_TK: Tensor, valid_TK: Tensor | None, num_experts: int) -> Tensor:
    """[T, E] bool: the experts each token was routed to (valid slots only)."""
    T = ids_TK.shape[0]
    mask = torch.zeros(T, num_experts, dtype=torch.bool, device=ids_TK.device)
    src = torch.ones_like(ids_TK, dtype=torch.bool) if valid_TK is None else valid_TK
    # scatter with `amax` so an invalid slot never clears a valid one pointing at the same expert
    return mask.scatter_reduce(1, ids_TK, src, reduce="amax")


def entropy_of(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along `dim` (0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def mutual_information_from_joint(joint: Tensor) -> float:
    """Mutual information (nats) of a joint count table."""
    n = joint.sum()
    if n <= 0:
        return math.nan
    p = joint.double() / n
    px, py = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (px @ py)[nz]).log()).sum())


def binned_mutual_information(labels_a: Tensor, labels_b: Tensor) -> float:
    """The RMoE paper's measure: for each token, the mutual information between its two label
    vectors (the E experts are the paired samples), averaged over tokens. Labels are [T, E]."""
    if labels_a.shape[0] == 0:
        return math.nan
    E = labels_a.shape[1]
    eq_a = labels_a.unsqueeze(2) == labels_a.unsqueeze(1)          # [T, E, E]
    eq_b = labels_b.unsqueeze(2) == labels_b.unsqueeze(1)
    n_x, n_y, n_xy = eq_a.sum(-1).double(), eq_b.sum(-1).double(), (eq_a & eq_b).sum(-1).double()
    # plug-in estimate over E samples: (1/E) sum_e log(E n_xy(e) / (n_x(e) n_y(e)))
    return float((E * n_xy / (n_x * n_y)).log().mean(-1).mean())


def digitise(probs_TE: Tensor, bins: int = MI_BINS) -> Tensor:
    """Equal bins on [0, 1] (a probability of exactly 1 goes to the last bin)."""
    return (probs_TE * bins).long().clamp(0, bins - 1).to(torch.uint8 if bins <= 256 else torch.int16)


class _Layer:
    """Running sums of one routed layer."""

    def __init__(self, obs: RouteObservation, vocab: int | None):
        layer = obs.layer
        self.name, self.E, self.K = layer.name, layer.num_experts, layer.top_k
        self.router = layer.router
        self.load = torch.zeros(self.E, dtype=torch.float64)
        self.co = torch.zeros(self.E, self.E, dtype=torch.float64)
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        self.sums = {"tokens": 0.0, "slots": 0.0, "entropy": 0.0, "topk_mass": 0.0,
                     "logit_std": 0.0, "logit_tokens": 0.0, "logit_sq": 0.0, "logit_sum": 0.0,
                     "logit_count": 0.0, "agree_top1": 0.0, "agree_overlap": 0.0, "agree_tokens": 0.0}
        # what the layer's own choice is called: its name, else the variant's registered name
        self.alternative = layer.alternative_name or getattr(layer, "kind", None)
        self.ib: list[Tensor] = []
        self.ob: list[Tensor] = []
        self.mi_labels: list[Tensor] = []
        self.mi_count = 0
        # kept on the model's device: [E * V] is large for big vocabularies
        device = obs.probs_TE.device
        self.top1 = torch.zeros(self.E, dtype=torch.int64)   # tokens whose most probable expert is e
        self.token_counts = torch.zeros(self.E * vocab, dtype=torch.int64, device=device) if vocab else None
        self.token_seen = torch.zeros(vocab or 0, dtype=torch.int64, device=device)
        self.vocab = vocab

    def add(self, obs: RouteObservation, mi_tokens: int) -> Tensor:
        """Add one forward's decisions; returns each token's top-1 expert (for the cross-layer MI)."""
        p = obs.probs_TE.float()
        T = p.shape[0]
        sel = selected_mask(obs.expert_ids_TK, obs.valid_TK, self.E)
        s = self.sums
        s["tokens"] += T
        s["slots"] += float(sel.sum())
        self.load += sel.sum(0).double().cpu()
        self.co += (sel.t().double() @ sel.double()).cpu()
        ent = entropy_of(p)
        s["entropy"] += float(ent.sum())
        top = math.log(self.E)
        if self.E > 1:
            self.hist += torch.histc(ent.double().cpu().clamp(0, top), bins=HIST_BINS, min=0.0, max=top)
        else:   # one expert: every entropy is 0
            self.hist[0] += T
        s["topk_mass"] += float((p * sel).sum())
        ranked = p.topk(min(max(self.K, 2), self.E), dim=-1).values
        if self.E > 1:
            self.ib.append((ranked[:, 0] / ranked[:, 1].clamp_min(1e-30)).cpu())
        self.ob.append(ranked[:, :self.K].sum(-1).cpu())
        if obs.logits_TE is not None:
            lg = obs.logits_TE.double()
            s["logit_std"] += float(lg.std(-1, unbiased=False).sum())
            s["logit_tokens"] += T
            s["logit_sum"] += float(lg.sum())
            s["logit_sq"] += float((lg * lg).sum())
            s["logit_count"] += lg.numel()
        other = obs.alternative
        if other is not None:   # the experts the layer's variant would choose by its own mechanism
            s["agree_top1"] += float((p.argmax(-1) == other[:, 0]).sum())
            s["agree_overlap"] += float(sel.gather(1, other).float().mean(-1).sum())
            s["agree_tokens"] += T
        if self.mi_count < mi_tokens:
            take = min(T, mi_tokens - self.mi_count)
            self.mi_labels.append(digitise(p[:take]).cpu())
            self.mi_count += take
        if self.token_counts is not None and obs.token_ids_T is not None:
            tok = obs.token_ids_T.reshape(-1, 1).expand(-1, self.E)
            flat = (torch.arange(self.E, device=tok.device) * self.vocab + tok)[sel]
            self.token_counts += torch.bincount(flat, minlength=self.E * self.vocab)
            self.token_seen += torch.bincount(obs.token_ids_T.reshape(-1), minlength=self.vocab)
        top1 = p.argmax(-1)
        self.top1 += torch.bincount(top1, minlength=self.E).cpu()
        return top1

    def result(self, tokenizer: Any) -> dict[str, Any]:
        s, E = self.sums, self.E
        T = max(s["tokens"], 1.0)
        mean = self.load.mean().item()
        # the load measures training logs too, from the same function
        base = layer_summary(self.load, 0.0, 0.0, s["entropy"] / T, int(T))
        out: dict[str, Any] = {
            "experts": E,
            "top_k": self.K,
            "tokens": int(s["tokens"]),
            "tokens_per_expert": base["load"],
            "experts_per_token": base["experts_per_token"],
            "imbalance": base["imbalance"],
            "cv": base["cv"],
            "utilisation": [x / mean if mean > 0 else math.nan for x in self.load.tolist()],
            "dead_fraction": base["dead"] / E if mean > 0 else math.nan,
            "diversity": base["diversity"],
            "entropy": s["entropy"] / T,
            "entropy_max": math.log(E),
            "entropy_hist": {"edges": torch.linspace(0, math.log(E), HIST_BINS + 1).tolist(),
                             "counts": [int(x) for x in self.hist.tolist()]},
            "topk_mass": s["topk_mass"] / T,
            "inner_balance": _median(self.ib),
            "outer_balance": _median(self.ob),
            "co_selection": (self.co / T).tolist(),
            "logit_std": s["logit_std"] / s["logit_tokens"] if s["logit_tokens"] else None,
            "logit_std_all": _pooled_std(s) if s["logit_count"] else None,
            "bias": _bias(self.router),
            "variant_agreement": None,
            "preferred_tokens": self.preferred(tokenizer),
        }
        if s["agree_tokens"]:
            out["variant_agreement"] = {"with": self.alternative, "top1": s["agree_top1"] / s["agree_tokens"],
                                        "overlap": s["agree_overlap"] / s["agree_tokens"]}
        return out

    def preferred(self, tokenizer: Any) -> list[list[dict[str, Any]]] | None:
        """Per expert, the tokens most often sent to it: share = (slots of token v at expert e) /
        (occurrences of v), over tokens seen at least PREFERRED_MIN_COUNT times."""
        if self.token_counts is None or not self.token_counts.any():
            return None
        counts = self.token_counts.view(self.E, self.vocab).double().cpu()
        seen = self.token_seen.double().cpu()
        share = counts / seen.clamp_min(1)
        share[:, seen < PREFERRED_MIN_COUNT] = -1
        # rank by share (to 0.1%), then by how often the token went there
        rank = (share * 1000).round() * (counts.max() + 1) + counts
        out = []
        for e in range(self.E):
            ids = rank[e].topk(min(PREFERRED, self.vocab)).indices.tolist()
            out.append([{"id": v, "token": _decode(tokenizer, v), "share": float(share[e, v]),
                         "count": int(counts[e, v])} for v in ids if share[e, v] > 0])
        return out


def _pooled_std(s: dict[str, float]) -> float:
    n = s["logit_count"]
    mean = s["logit_sum"] / n
    return math.sqrt(max(s["logit_sq"] / n - mean * mean, 0.0))


def _median(parts: list[Tensor]) -> float | None:
    if not parts:
        return None
    v = torch.cat(parts).double().sort().values
    return float((v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2)   # the mean of the two middle values


def _bias(router: Any) -> list[float] | None:
    bias = getattr(router, "expert_bias", None)
    return [float(x) for x in bias.tolist()] if isinstance(bias, Tensor) else None


def _decode(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id])


class RoutingAnalysis:
    """The observer that `moectl eval` passes to the model. See the module docstring."""

    def __init__(self, vocab_size: int | None = None, mi_tokens: int = MI_TOKENS):
        self.vocab, self.mi_tokens = vocab_size, mi_tokens
        self.layers: dict[str, _Layer] = {}
        self.joint: dict[tuple[str, str], Tensor] = {}
        self._top1: dict[str, Tensor] = {}       # this forward's top-1 experts, by layer

    @torch.no_grad()
    def __call__(self, obs: RouteObservation) -> None:
        if obs.layer.index == 0:
            self._top1 = {}
        layer = self.layers.get(obs.name)
        if layer is None:
            layer = self.layers[obs.name] = _Layer(obs, self.vocab)
        top1 = layer.add(obs, self.mi_tokens)
        for other, t in self._top1.items():
            E_a, E_b = self.layers[other].E, layer.E
            if t.shape != top1.shape:
                continue
            key = (other, obs.name)
            flat = torch.bincount((t * E_b + top1).cpu(), minlength=E_a * E_b).view(E_a, E_b)
            self.joint[key] = self.joint.get(key, torch.zeros(E_a, E_b, dtype=torch.int64)) + flat
        self._top1[obs.name] = top1

    def mutual_information(self) -> dict[str, Any]:
        """Layer x layer matrices: the binned per-token MI and the top-1 MI (diagonal: a layer with
        itself, i.e. its entropy under each measure)."""
        names = list(self.layers)
        n = len(names)
        binned = [[math.nan] * n for _ in range(n)]
        top1 = [[math.nan] * n for _ in range(n)]
        labels = {k: torch.cat(v.mi_labels) if v.mi_labels else torch.zeros(0, v.E) for k, v in self.layers.items()}
        for i, a in enumerate(names):
            for j, b in enumerate(names[i:], start=i):
                la, lb = labels[a], labels[b]
                if la.shape == lb.shape:
                    binned[i][j] = binned[j][i] = binned_mutual_information(la, lb)
                joint = self._self_joint(a) if i == j else self.joint.get((a, b))
                if joint is not None:
                    top1[i][j] = top1[j][i] = mutual_information_from_joint(joint)
        return {"layers": names, "binned": binned, "top1": top1, "binned_tokens": min(
            (v.mi_count for v in self.layers.values()), default=0)}

    def _self_joint(self, name: str) -> Tensor:
        """The top-1 joint table of a layer with itself: its top-1 counts on the diagonal."""
        return torch.diag(self.layers[name].top1)

    def result(self, tokenizer: Any = None) -> dict[str, Any]:
        """The report: per-layer measures, their means over layers, and the cross-layer MI."""
        layers = {name: layer.result(tokenizer) for name, layer in self.layers.items()}
        return {"layer_order": list(layers), "layers": layers, "overall": overall(layers),
                "mutual_information": self.mutual_information() if layers else None}


OVERALL_KEYS = ("imbalance", "cv", "dead_fraction", "diversity", "entropy", "topk_mass", "inner_balance",
                "outer_balance", "logit_std", "experts_per_token")


def overall(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over layers of the per-layer scalars (layers where a measure is undefined left out),
    the worst layer's imbalance, and the mean agreement with the variant's own choice where there
    is one."""
    out: dict[str, Any] = {}
    for key in OVERALL_KEYS:
        vals = [v[key] for v in layers.values() if isinstance(v.get(key), (int, float)) and math.isfinite(v[key])]
        out[key] = sum(vals) / len(vals) if vals else None
    imb = [v["imbalance"] for v in layers.values() if math.isfinite(v["imbalance"])]
    out["imbalance_max"] = max(imb) if imb else None
    agree = [v["variant_agreement"] for v in layers.values() if v.get("variant_agreement")]
    if agree:
        out["variant_agreement"] = {"with": agree[0]["with"],
                                    **{k: sum(a[k] for a in agree) / len(agree) for k in ("top1", "overlap")}}
    return out
