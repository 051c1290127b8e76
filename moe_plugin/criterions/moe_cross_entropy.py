"""``moe_cross_entropy``: token cross-entropy plus the routers' weighted aux losses.

    loss = sum_t CE_t + sample_size * sum_layers sum_name w_name * aux_name

The aux losses are per-token means, so scaling by ``sample_size`` gives them the same
weight per token as the summed cross-entropy once fairseq divides the gradient by the
total sample size; with ``--update-freq`` the micro-batches' aux terms are thereby averaged
by their token counts. The criterion pulls the losses and routing stats from the model's
MoE layers after the forward (fairseq's adaptive-span pattern), never from globals.

Weights: ``--moe-aux-loss-weight`` for every balance-type loss, ``--moe-z-loss-weight`` for
``z``; ``--moe-loss-weights name=w,...`` sets any loss by name (e.g. SAM's ``align``).

Logged (train and valid), averaged over forwards and workers, overall and per MoE layer
(``moe_l{i}_*``, i = decoder layer index): aux loss, load max/mean (tokens per expert),
coefficient of variation of the load, % of token slots dropped, router entropy (nats),
unused experts. ``nll_loss``/``ppl`` are the pure cross-entropy; ``loss`` includes aux.
"""


import math
from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig


@dataclass
class MoECrossEntropyConfig(CrossEntropyCriterionConfig):
    moe_aux_loss_weight: float = field(default=0.01, metadata={"help": "weight of the load-balancing (aux) losses"})
    moe_z_loss_weight: float = field(default=0.0, metadata={"help": "weight of the router z-loss"})
    moe_loss_weights: str = field(
        default="", metadata={"help": "per-name aux loss weights, e.g. 'align=0.1,balance=0.01' (override the two above)"}
    )
    moe_no_log_per_layer: bool = field(
        default=False, metadata={"help": "log routing metrics only overall, not per MoE layer (default: both)"}
    )


def parse_loss_weights(spec: str) -> Dict[str, float]:
    out = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"--moe-loss-weights: {item!r} is not of the form name=float (e.g. 'align=0.1')"
            ) from None
    return out


def load_stats(tokens_per_expert_E: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Load balance figures of one layer's (E,) slot counts, as 0-dim tensors."""
    c = tokens_per_expert_E.double()
    mean = c.mean().clamp(min=1e-9)
    return {
        "load_max": c.max() / mean,
        "load_cv": c.std(unbiased=False) / mean,
        "unused": (c == 0).sum().double(),
    }


# name -> how it reduces (every one is an average over forwards; kept for clarity)
LAYER_METRICS = ("aux", "load_max", "load_cv", "dropped", "entropy", "unused")


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoECrossEntropyCriterion(CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, moe_aux_loss_weight=0.01, moe_z_loss_weight=0.0,
                 moe_loss_weights="", moe_no_log_per_layer=False):
        super().__init__(task, sentence_avg)
        for name, v in (("--moe-aux-loss-weight", moe_aux_loss_weight), ("--moe-z-loss-weight", moe_z_loss_weight)):
            if not v >= 0:
                raise ValueError(f"{name}: {v} is not allowed; it must be >= 0")
        self.aux_weight = moe_aux_loss_weight
        self.z_weight = moe_z_loss_weight
        self.named_weights = parse_loss_weights(moe_loss_weights)
        self.log_per_layer = not moe_no_log_per_layer

    def loss_weight(self, name: str) -> float:
        if name in self.named_weights:
            return self.named_weights[name]
        return self.z_weight if name == "z" else self.aux_weight

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        nll, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        aux_total = nll.new_zeros(())
        log = {
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if layers:
            log["moe_n"] = 1
            # every logged figure is gathered as a tensor and read back in one transfer: a
            # float() per figure would wait for the device once per layer and figure
            names, values = [], []
            for index, layer in layers:
                weighted = nll.new_zeros(())
                for name, value in layer.last_aux_losses.items():
                    w = self.loss_weight(name)
                    if w != 0.0:
                        weighted = weighted + w * value.to(weighted.dtype)
                aux_total = aux_total + weighted
                st = layer.last_stats
                m = load_stats(st["tokens_per_expert"])
                m["aux"] = weighted.detach()
                m["dropped"] = 100.0 * torch.as_tensor(st.get("dropped_frac", 0.0))
                m["entropy"] = torch.as_tensor(st.get("entropy", float("nan")))
                for k in LAYER_METRICS:
                    names.append((index, k))
                    values.append(m[k])
                for k, v in st.items():  # router-specific extras, e.g. BASE's auction rounds
                    if k not in ("tokens_per_expert", "dropped_frac", "entropy", "num_tokens") and v.numel() == 1:
                        names.append((index, k))
                        values.append(v.reshape(()))
            dev = nll.device
            read = torch.stack([v.detach().to(dev, torch.float64) for v in values]).tolist()
            sums = {k: 0.0 for k in LAYER_METRICS}
            for (index, k), v in zip(names, read):
                if k in sums:
                    sums[k] += v / len(layers)
                    if not self.log_per_layer:
                        continue
                log[f"moe_l{index}_{k}"] = v
            for k in LAYER_METRICS:
                log[f"moe_{k}"] = sums[k]
        loss = nll + aux_total * sample_size
        log["loss"] = loss.data
        return loss, sample_size, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        loss_sum, nll_sum = total("loss"), total("nll_loss")
        ntokens, sample_size = total("ntokens"), total("sample_size")
        metrics.log_scalar("loss", loss_sum / max(sample_size, 1) / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        n = total("moe_n")
        if n:
            keys = sorted({k for log in logging_outputs for k in log if k.startswith("moe_") and k != "moe_n"})
            for k in keys:
                metrics.log_scalar(k, total(k) / n, n, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
