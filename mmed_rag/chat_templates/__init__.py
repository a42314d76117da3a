"""Chat templates of the original generators, as Jinja data files.

The generator's prompt format is part of the model: LLaVA-Med-1.5 was tuned on the "mistral_instruct"
conversation format of LLaVA-Med's ``llava/conversation.py`` and answers worse in any other. Each template here
renders exactly the string that the original ``Conversation.get_prompt()`` gives, so a converted checkpoint sees
the prompts it was trained on. They are files, not Python strings, so that ``processor.save_pretrained`` can
write them out unchanged and a reader can diff them against the original.
"""

from __future__ import annotations

from importlib import resources

#: Template for llava-med-v1.5-mistral-7b (conversation mode "mistral_instruct").
LLAVA_MED_MISTRAL = "llava_med_mistral"
#: Template for LLaVA-Med v1 / Vicuna checkpoints (conversation mode "vicuna_v1").
VICUNA_V1 = "vicuna_v1"


def available_chat_templates() -> list[str]:
    """Names accepted by :func:`load_chat_template`, one per ``*.jinja`` file in this package."""
    return sorted(
        entry.name.removesuffix(".jinja")
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".jinja")
    )


def load_chat_template(name: str) -> str:
    """Return the Jinja source of the chat template ``name`` (e.g. ``"llava_med_mistral"``)."""
    source = resources.files(__name__) / f"{name}.jinja"
    if not source.is_file():
        raise ValueError(f"Unknown chat template {name!r}; available: {', '.join(available_chat_templates())}.")
    return source.read_text(encoding="utf-8")
