"""repa_fast: a fast, faithful trainer for diffusion transformers with representation alignment (REPA)."""

from setuptools import find_packages, setup

EXTRAS = {
    # The embedded demo: a real small dataset (scikit-learn digits) and PNG plots.
    "demo": ["scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard>=2.14"],
    # SD-VAE encode/decode for preprocessing and preview grids.
    "vae": ["diffusers>=0.27"],
    # The torch_autocast section and the ZeRO state helpers we rely on (tested: 0.19.8).
    "deepspeed": ["deepspeed>=0.19"],
    "flash": ["flash-attn>=2.6"],
    # MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 target encoders (timm's ViT; DINOv2 needs nothing extra).
    "encoders": ["timm>=1.0"],
    "logging": ["tensorboard>=2.14"],
    # --loader dali and preprocess --decoder dali (its CPU pipeline runs anywhere; CUDA 13 users may prefer
    # nvidia-dali-cuda130, same API).
    "dali": ["nvidia-dali-cuda120>=2.4"],
    "wandb": ["wandb>=0.16"],  # --report-to wandb
    # --fp8 tensorwise|rowwise: torchao's float8 training (tested: torchao 0.18.0 with torch 2.14.1; CPU emulation in
    # the tests, fp8 tensor cores need an sm_89+ GPU).
    "fp8": ["torchao>=0.18"],
    # python -m repa_fast.evaluate (SciPy's sqrtm for the Fréchet distance), CKNNA / linear-probe plots, FD-digits.
    "eval": ["scipy>=1.10", "matplotlib>=3.7", "scikit-learn>=1.3"],
}
EXTRAS["dev"] = sorted(
    set(
        EXTRAS["demo"]
        + EXTRAS["vae"]
        + EXTRAS["deepspeed"]
        + EXTRAS["logging"]
        + EXTRAS["dali"]  # the DALI tests run its CPU pipeline
        + EXTRAS["eval"]
        + EXTRAS["fp8"]  # tests/engine/test_fp8.py runs torchao's emulation on CPU
        + [
            "pytest>=7.4",
            "triton>=3.0",  # kernels are tested on CPU through Triton's interpreter
            "timm>=1.0",  # only as an oracle for the in-package DINOv2 (it pulls torchvision)
            "ruff==0.17.6",  # pinned: .ci/run checks `ruff check` and `ruff format --check`, whose rules move
            "accelerate>=0.30",  # `accelerate launch` is tested as a launcher (REPA's README command)
            "torch-fidelity>=0.3",  # only as an oracle for the in-package TF-ported InceptionV3 (tests/eval)
        ]
    )
)

setup(
    name="repa_fast",
    version="0.1.0",
    description="Fast, faithful REPA/ERW training of SiT diffusion transformers",
    packages=find_packages(include=["repa_fast", "repa_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy>=1.24", "safetensors>=0.4", "tqdm>=4.60", "pillow>=9.0"],
    extras_require=EXTRAS,
)
