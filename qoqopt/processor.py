"""Load a checkpoint's processor (tokenizer + image processor + chat template) from its own files.

`AutoProcessor.from_pretrained` is the real path and is used whenever it works. In transformers 5
the Qwen2.5-VL processor also builds a *video* processor, which requires torchvision; the CPU
torch wheel used here has no matching torchvision on PyPI. QoQ-Med reads images only, so without
torchvision we assemble the same processor class from the same files, leaving video out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def load_processor(path: str | Path):
    from transformers import AutoProcessor

    if has_torchvision():
        return AutoProcessor.from_pretrained(str(path))
    return _image_only_processor(Path(path))


def _image_only_processor(path: Path):
    import json

    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template_file = path / "chat_template.json"
    template = json.loads(template_file.read_text())["chat_template"] if template_file.exists() else None
    return _image_only_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def _image_only_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor whose sub-processors are image + tokenizer (the mixin reads __init__)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2_5_VLProcessor
