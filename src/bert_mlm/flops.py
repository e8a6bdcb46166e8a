"""Model FLOPs per token of BERT MLM training, and the peak FLOP/s that MFU divides by."""

import time

import torch
from transformers import BertConfig

# Dense bf16/fp16 tensor-core peaks from the datasheets (FLOP/s), matched against the device name.
GPU_PEAKS = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def flops_per_token(config: BertConfig, seq_len: int, mlm_probability: float) -> float:
    """Forward + backward (3x forward, 2 FLOPs a multiply-add) per input token: the
    encoder's matrix products, attention over `seq_len` positions, and the MLM head on the
    `mlm_probability` share of tokens that are predicted. Embedding look-ups are free."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    encoder = layers * (4 * h * h + 2 * h * i)  # Q, K, V, O and the two FFN matrices
    attention = layers * 2 * seq_len * h  # Q @ K^T and scores @ V
    head = mlm_probability * (h * h + h * config.vocab_size)  # transform + decoder
    return 6 * (encoder + attention + head)


def peak_flops(device: torch.device) -> float | None:
    """The datasheet bf16 peak of a known GPU; None where unknown (set it in the config)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAKS.items() if key in name), None)


def measure_peak_flops(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10, tries: int = 4) -> float:
    """FLOP/s of an n^3 matrix product, the best of `tries` timings of `reps` products:
    the roofline that MFU is measured against on a CPU."""
    rng = torch.Generator(device).manual_seed(0)  # not the global one, which dropout draws from
    a, b = (torch.randn(n, n, generator=rng, device=device).to(dtype) for _ in range(2))
    best = 0.0
    for _ in range(tries):  # the first warms up; others may be disturbed
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best
