"""Loading base models in 4-bit (bitsandbytes) and attaching or loading LoRA adapters (PEFT)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.errors import DeviceUnavailable, NotFound
from core.paths import ADAPTER_WEIGHTS
from core.schemas import BaseModelSpec, LoraSettings, QuantizationSettings
from jobs.tiny import tiny_model_dir

CausalLM = PreTrainedModel | PeftModel  # a base model, or one with a LoRA adapter attached or loaded
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(preference: str = "auto") -> str:
    """`cuda` when asked for or available, else `cpu`; asking for cuda without one is a DeviceUnavailable."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device: cuda was asked for but no CUDA GPU is visible; use device: cpu or auto")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def compute_dtype(quant: QuantizationSettings, device: str) -> torch.dtype:
    """The matmul dtype: bf16 on a GPU, fp32 on a CPU, unless the config names one."""
    if quant.compute_dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[quant.compute_dtype]


def model_source(spec: BaseModelSpec) -> str:
    """Where transformers loads the base from: the tiny model's cached folder, or the Hub id."""
    return str(tiny_model_dir(spec)) if spec.tiny else spec.hf_id


def load_tokenizer(spec: BaseModelSpec) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, left-padding for batched generation, with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(model_source(spec))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: BaseModelSpec, quant: QuantizationSettings, device: str) -> PreTrainedModel:
    """The base model with its linear layers in 4-bit nf4 (double quantization) when `load_in_4bit`."""
    dtype = compute_dtype(quant, device)
    kwargs: dict = {"dtype": dtype, "device_map": {"": device}}
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(model_source(spec), **kwargs)
    keep_compute_dtype_kernel(model)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model


def lora_config(settings: LoraSettings) -> LoraConfig:
    """PEFT's LoRA config from ours."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def prepare_for_training(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """Prepare a (4-bit) base for k-bit training (PEFT's preparation), with gradient checkpointing if asked, its 4-bit
    layers kept on the kernel that trains whoever loaded it (`keep_compute_dtype_kernel`)."""
    if getattr(model, "is_loaded_in_4bit", False):
        keep_compute_dtype_kernel(model)
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def keep_compute_dtype_kernel(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from moving `model`'s 4-bit layers to its AVX512-BF16 CPU inference kernel. On such a CPU a
    layer's first forward in eval mode without gradients repacks its weights for that kernel for good (bitsandbytes
    0.50.2), and the kernel (1) computes in bf16 whatever the configured compute dtype (fp32 on a CPU), which turns the
    last-bit differences between two batchings of the same row into logit changes near 1e-3, enough to flip a greedy
    near-tie: the sweep's evaluator and per-job `generate` then disagreed on about 1 row in 100; (2) passes no gradient
    to its input, so training after an evaluation (a search trial's validation) lost the base's share of every earlier
    layer's gradient. On this 2-core CPU the plain kernel (dequantize, fp32 matmul) evaluates the tiny models as fast
    and serves them about a quarter slower (benchmarks/README.md). A no-op on a GPU and on CPUs without AVX512-BF16."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model: PreTrainedModel, settings: LoraSettings, gradient_checkpointing: bool) -> PeftModel:
    """Prepare a (4-bit) base for k-bit training and attach a fresh LoRA adapter."""
    return get_peft_model(prepare_for_training(model, gradient_checkpointing), lora_config(settings))


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """`adapter_dir` as a Path, or a NotFound when it holds no adapter weights in safetensors."""
    path = Path(adapter_dir)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise NotFound(f"{path} holds no {ADAPTER_WEIGHTS}")
    return path


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, adapter_name: str = "default") -> PeftModel:
    """Load a saved adapter (safetensors only) onto a base model for inference."""
    path = check_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=False)
