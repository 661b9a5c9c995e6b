"""GPU memory a QLoRA job needs, from the base model's shape and the job's settings (an estimate, in GB).

Terms: 4-bit linear weights with their quantization constants, 16-bit embeddings and LM head, LoRA
weights with gradients and AdamW state, activations (one saved hidden state per layer plus one
layer's recomputation with gradient checkpointing, every layer's without), the logits in fp32 with
their gradient (over every token: an upper bound, as training runs the LM head only where a token predicts an
answer token, `jobs.train.answer_token_losses`), and the CUDA context and allocator slack.
"""

from __future__ import annotations

from core.families import family
from core.schemas import BaseModelSpec, LoraSettings, QuantizationSettings, TrainingSettings

GB = 1024**3
CUDA_OVERHEAD_BYTES = 1.0 * GB
NF4_BYTES = 0.5
QUANT_CONSTANT_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}  # per weight, blocksize 64; keyed by double_quant
TRAINABLE_BYTES = 4 + 4 + 8  # fp32 weight, gradient, two AdamW moments


def linear_shapes(spec: BaseModelSpec) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear projection of one block, by module name (as its family lays them out)."""
    return family(spec.family).linear_shapes(spec.architecture)


def lora_parameters(spec: BaseModelSpec, lora: LoraSettings) -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted projection per layer."""
    shapes = linear_shapes(spec)
    if lora.target_modules != "all-linear":
        shapes = {name: shape for name, shape in shapes.items() if name in lora.target_modules}
    return spec.architecture.num_layers * sum(lora.r * (i + o) for i, o in shapes.values())


def shared_memory_gb(spec: BaseModelSpec, quant: QuantizationSettings) -> float:
    """What a job's peak memory holds whatever it trains, and co-trained jobs share (jobs/cotrain.py): the base's
    weights (4-bit linear layers with their constants, 16-bit embeddings and LM head) and the CUDA context, in GB."""
    a = spec.architecture
    linear = a.num_layers * sum(i * o for i, o in linear_shapes(spec).values())
    embeddings = a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    weight_bytes = NF4_BYTES + QUANT_CONSTANT_BYTES[quant.double_quant] if quant.load_in_4bit else 2
    return (linear * weight_bytes + embeddings * 2 + CUDA_OVERHEAD_BYTES) / GB


def estimate_memory_gb(spec: BaseModelSpec, lora: LoraSettings, quant: QuantizationSettings,
                       training: TrainingSettings) -> float:
    """Peak GPU memory of one fine-tuning job in GB: `shared_memory_gb` plus `member_memory_gb`."""
    return shared_memory_gb(spec, quant) + member_memory_gb(spec, lora, training)


def member_memory_gb(spec: BaseModelSpec, lora: LoraSettings, training: TrainingSettings) -> float:
    """What one fine-tune adds to the base in GB, alone or as a co-trained member: its adapter and optimizer state,
    activations and logits."""
    a = spec.architecture
    tokens = training.micro_batch_size * training.max_seq_length
    one_layer = tokens * (10 * a.hidden_size + 3 * a.intermediate_size) * 2
    if training.gradient_checkpointing:  # one saved hidden state per layer, one layer's activations recomputed
        saved = tokens * a.hidden_size * 2 * a.num_layers + one_layer
    else:
        saved = one_layer * a.num_layers
    logits = tokens * a.vocab_size * (2 + 4 + 4)
    return (lora_parameters(spec, lora) * TRAINABLE_BYTES + saved + logits) / GB
