"""The RAG-PT DPO trainer: trl's DPOTrainer with the per-side-image collator, answer-token log-probs, a projector
learning rate and adapter-only saves."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from trl import DPOTrainer

from mmed_rag.alignment.dpo_config import PROJECTOR, DPOError, MMedRAGDPOConfig

logger = logging.getLogger(__name__)


class MMedRAGDPOTrainer(DPOTrainer):
    """trl's DPOTrainer with RAG-PT's collator, a projector learning rate and adapter-only saves.

    - the collator (:class:`~mmed_rag.alignment.collator.RAGPreferenceCollator`) scores each side of a pair on its
      own image; its columns are kept through ``remove_unused_columns``;
    - ``create_optimizer`` puts the projector's parameters in their own group at ``mm_projector_lr``, after the
      LoRA group, so the logged ``learning_rate`` is the LoRA one (like LLaVA's trainer);
    - a loaded adapter (stage 2) gets trl's frozen ``"ref"`` copy as reference only with
      ``stage2_reference="stage1"``; by default it is removed and the reference is the adapter disabled;
    - the fused log-prob head projects the answer tokens only on every eager device, CPU included
      (:mod:`~mmed_rag.alignment.answer_logprobs`);
    - saves write the trained ``"default"`` adapter only (trl's ``"ref"`` copy breaks ZeRO-3 saves otherwise).
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: MMedRAGDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs: Any,
    ) -> None:
        from transformers import ProcessorMixin

        from mmed_rag.alignment.collator import RAGPreferenceCollator

        if not isinstance(processing_class, ProcessorMixin):
            raise DPOError("MMedRAGDPOTrainer needs the model's processor (tokenizer + image processor)")
        args = args if args is not None else MMedRAGDPOConfig()
        if data_collator is None:
            data_collator = RAGPreferenceCollator(
                processor=processing_class,
                max_length=args.max_length,
                noise_seed=args.seed,
                chosen_noised_mode=getattr(args, "chosen_noised_mode", "chosen"),
            )
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._score_answer_tokens_only()
        if "ref" in getattr(self.model, "peft_config", {}):
            if getattr(self.args, "stage2_reference", "base") == "base":
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")
                logger.info("Reference model: the base model (adapter disabled), as the original stage 2.")
            else:
                logger.info("Reference model: the frozen copy of the loaded (stage-1) adapter.")

    def _score_answer_tokens_only(self) -> None:
        from peft import PeftModel

        from mmed_rag.alignment.answer_logprobs import DPO_OUTPUTS, score_answer_tokens_only

        policy = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        score_answer_tokens_only(policy, DPO_OUTPUTS + (("log_sum_sq_probs",) if self.use_weighting else ()))
        if self.ref_model is not None:
            score_answer_tokens_only(self.ref_model, ("log_probs",))

    def _set_signature_columns_if_needed(self) -> None:
        from mmed_rag.alignment.dataset import PAIR_COLUMNS

        super()._set_signature_columns_if_needed()
        self._signature_columns += [column for column in PAIR_COLUMNS if column not in self._signature_columns]

    def create_optimizer(self, model=None):
        projector_lr = getattr(self.args, "mm_projector_lr", None)
        if self.optimizer is not None or projector_lr is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        trainable = [(name, param) for name, param in opt_model.named_parameters() if param.requires_grad]
        groups = []
        for is_projector in (False, True):  # LoRA first: Trainer logs param_groups[0]'s lr
            for decays in (True, False):
                params = [p for n, p in trainable if (PROJECTOR in n) == is_projector and (n in decay) == decays]
                if params:
                    group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
                    if is_projector:
                        group["lr"] = projector_lr
                    groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from peft import PeftModel
        from transformers.trainer import TRAINING_ARGS_NAME

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, selected_adapters=["default"])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None
