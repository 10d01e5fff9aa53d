"""repa_fast: a fast, faithful trainer for diffusion transformers with representation alignment (REPA)."""

from setuptools import find_packages, setup

EXTRAS = {
    # The embedded demo: a real small dataset (scikit-learn digits) and PNG plots.
    "demo": ["scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard>=2.14"],
    # SD-VAE encode/decode for preprocessing and preview grids.
    "vae": ["diffusers>=0.27"],
    "deepspeed": [
        "deepspeed>=0.19"
    ],  # the torch_autocast section and the ZeRO state helpers we rely on (tested: 0.19.8)
    "flash": ["flash-attn>=2.6"],
    "logging": ["tensorboard>=2.14"],
    # python -m repa_fast.evaluate (SciPy's sqrtm for the Fréchet distance), CKNNA / linear-probe plots, FD-digits.
    "eval": ["scipy>=1.10", "matplotlib>=3.7", "scikit-learn>=1.3"],
}
EXTRAS["dev"] = sorted(
    set(
        EXTRAS["demo"]
        + EXTRAS["vae"]
        + EXTRAS["deepspeed"]
        + EXTRAS["logging"]
        + EXTRAS["eval"]
        + [
            "pytest>=7.4",
            "triton>=3.0",  # kernels are tested on CPU through Triton's interpreter
            "timm>=1.0",  # only as an oracle for the in-package DINOv2 (it pulls torchvision)
            "ruff>=0.5",
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
