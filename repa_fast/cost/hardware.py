"""The cards the cost model knows, and the efficiencies it assumes on them (explicit inputs, never hidden).

Peaks are NVIDIA's datasheet figures for dense math (the datasheets print tensor-core rates "with sparsity", twice
the dense rate; the dense rate is what a training GEMM can reach):
- H100 SXM5 80 GB: BF16/FP16 989.4 TFLOP/s dense (1,979 with sparsity), FP8 1,979 dense (3,958), HBM3 3.35 TB/s,
  NVLink 900 GB/s (both directions together). NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100).
- H200 SXM 141 GB: the H100's GH100 compute (same BF16/FP8 rates), HBM3e 4.8 TB/s, NVLink 900 GB/s.
  NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200).
- A100 SXM4 80 GB: BF16/FP16 312 TFLOP/s dense (624 with sparsity), no FP8, HBM2e 2,039 GB/s, NVLink 600 GB/s.
  NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf).
Memory is the marketed capacity (GB = 1e9 bytes); the allocator sees a little less (``Efficiency.reserved_gb``).

The efficiencies are assumptions until a GPU measures them (bench/gpu_check.py). The attention defaults sit below
the FlashAttention-3 paper's H100 forward numbers at its shortest sequence, 512 tokens (Shah et al. 2024,
arXiv:2407.08608, Fig. 5: head dim 64, FA2 ~282, cuDNN ~335, FA3 ~333 TFLOP/s; head dim 128, FA2 ~309, cuDNN ~497,
FA3 ~467), because SiT-XL/2 at 256 px attends over 256 tokens and the backward runs slower than the forward.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Card:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float  # 0 where the card has no FP8 tensor cores
    hbm_tb_s: float
    memory_gb: float
    nvlink_gb_s: float  # all links, both directions together (NVIDIA's figure); one direction is half
    source: str


GPUS = {
    "h100": Card("H100 SXM5 80GB", 989.4, 1978.9, 3.35, 80.0, 900.0, "NVIDIA H100 datasheet (SXM5)"),
    "h200": Card("H200 SXM 141GB", 989.4, 1978.9, 4.8, 141.0, 900.0, "NVIDIA H200 datasheet (SXM)"),
    "a100": Card("A100 SXM4 80GB", 312.0, 0.0, 2.039, 80.0, 600.0, "NVIDIA A100 datasheet (SXM4 80GB)"),
}

# Fraction of the dense BF16 peak an attention kernel reaches at 256 tokens, forward and backward together, on the
# FLOPs it actually computes (head dims padded as repa_fast.cost.attention says). Assumptions, see the docstring.
DEFAULT_ATTN_EFF = {"flash2": 0.22, "sdpa-flash": 0.22, "flash3": 0.28, "cudnn": 0.28, "math": 0.5}


@dataclass(frozen=True)
class Efficiency:
    """What the roofline assumes; every field is a ``bench/step_model.py`` flag and is printed with the table."""

    matmul: float = 0.70  # of the dense BF16 peak, large token GEMMs (cuBLAS reaches ~0.75-0.8 on big shapes)
    fp8_matmul: float = 0.60  # of the dense FP8 peak, tensorwise-scaled cuBLAS GEMMs
    fp8_rowwise: float = 0.50  # of the dense FP8 peak, rowwise-scaled CUTLASS GEMMs (torchao: slower than tensorwise)
    bandwidth: float = 0.80  # of HBM bandwidth, memory-bound kernels (elementwise, norms, optimizer, casts)
    attention: dict = field(default_factory=lambda: dict(DEFAULT_ATTN_EFF))
    kernel_us: float = 2.0  # GPU time lost per kernel launch (ramp-up/tail); CUDA graphs keep it
    host_us: float = 6.0  # host time to dispatch one eager op (Python + dispatcher); CUDA graphs remove it
    sync_us: float = 30.0  # GPU idle per device->host synchronisation (the queue drains and must refill)
    nvlink: float = 0.75  # of one direction of NVLink, NCCL ring collectives
    comm_overlap: float = 0.7  # fraction of gradient communication hidden behind the backward
    reserved_gb: float = 2.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack not usable by tensors
    fragmentation: float = 0.05  # extra fraction of the allocated bytes lost to the caching allocator

    def attn(self, backend: str) -> float:
        return self.attention[backend]


def card(name: str) -> Card:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown card {name!r}; known: {', '.join(GPUS)}") from None
