from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [line.split("#")[0].strip() for line in (here / "requirements.txt").read_text().splitlines()]

setup(
    name="megads",
    version="0.1.0",
    description="Train DeepSeek-V3-style MoE models (MLA, DeepSeekMoE, MTP) with Megatron-style parallelism, "
                "FP8 and GRPO post-training.",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megads", "megads.*", "parallel", "parallel.*"]),
    install_requires=[r for r in requirements if r],
    extras_require={
        # Transformer Engine needs CUDA to build; NVIDIA Apex is not on PyPI (the PyPI 'apex' is unrelated).
        "gpu": ["transformer-engine[pytorch]>=2.3", "nvidia-ml-py>=12"],
        "test": ["pytest>=8", "transformers>=5.0,<6", "mmaemu==0.1.0"],
    },
    entry_points={"console_scripts": ["megads=megads.cli:main"]},
)
