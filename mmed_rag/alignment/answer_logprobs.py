"""Score only the answer tokens in the DPO trainer's fused log-prob head, on every device.

trl 1.16's DPOTrainer replaces the model's forward with a fused LM head (``trl.trainer.utils.add_fused_lm_head``):
called with ``fused_lm_head=True`` it returns per-token log-probabilities without building the logits. With Triton
(CUDA, XPU) it projects only the positions that have a label, the answer tokens. Everywhere else it projects every
position of every row, to keep tile shapes fixed for compilers such as Neuron's, through one
``(min(tokens, 4096), 32768)`` float32 tile whatever the vocabulary. On a CPU that is most of a RAG-PT step's
memory and time: the prompt (retrieved reports, image tokens) is ten times longer than the answer, and the tile is
wider than a small vocabulary.

:func:`score_answer_tokens_only` wraps that forward so eager devices (CPU, MPS, CUDA, XPU) project the answer
tokens only, through trl's own ``ChunkedLogProbFunction`` with a tile no wider than the vocabulary. The log-probs
are the same numbers (a test compares both paths); other devices and models whose head scales or caps its logits
keep trl's forward untouched.
"""

from __future__ import annotations

import functools
import logging
import types

logger = logging.getLogger(__name__)

EAGER_DEVICES = frozenset({"cpu", "mps", "cuda", "xpu"})
MAX_TILE_WIDTH = 32768  # trl's vocabulary tile width; a smaller vocabulary gets a tile of its own width
# What trl's DPOTrainer reads from the policy's output (the reference reads ``log_probs`` only); the WPO weights'
# ``log_sum_sq_probs`` is added when the trainer uses them.
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _plain_head(text_config) -> bool:
    """True when the LM head is a bare projection: no logit scaling, soft-capping or MoE router loss to reproduce."""
    scaled = any(
        getattr(text_config, name, None) is not None
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier")
    )
    return (
        not scaled
        and getattr(text_config, "logits_scaling", None) is None
        and not getattr(text_config, "output_router_logits", False)
    )


def score_answer_tokens_only(model, outputs: tuple[str, ...] = DPO_OUTPUTS) -> bool:
    """Wrap ``model``'s trl fused forward (already added by the trainer) so it projects answer tokens only.

    Returns whether it did: a model whose head is not a bare projection keeps trl's forward.
    """
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    if not _plain_head(model.config.get_text_config()):
        logger.info("The LM head scales or caps its logits: trl's fused head scores every position.")
        return False
    trl_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        device = next(self.parameters()).device
        if not fused_lm_head or shift_labels is not None or device.type not in EAGER_DEVICES:
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        lm_head = self.get_output_embeddings()
        # split across devices (device_map), the backbone can end on another device than the head
        hidden_states = self.base_model(*args, **kwargs).last_hidden_state[:, :-1].to(lm_head.weight.device)
        labels = labels[:, 1:].to(lm_head.weight.device)
        mask = labels != -100
        with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
            tile_width = min(lm_head.weight.shape[0], MAX_TILE_WIDTH)
            per_token = ChunkedLogProbFunction.apply(
                hidden_states[mask], lm_head.weight, lm_head.bias, labels[mask], 1.0, tile_width, None, 1.0, outputs
            )
        # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero), as trl does
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
        )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq_probs,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True
