"""tmass: a distributed DeepSpeed trainer for T-MASS text-video retrieval.

Install on a CPU machine:   pip install torch==2.13.0 && pip install -r requirements.txt -e .
On a GPU cluster:          install your CUDA build of torch first, then pip install -e .
The exact pins of the CPU stack live in requirements.txt; install_requires only sets floors, so that a
cluster's own torch is kept.
"""

from setuptools import find_packages, setup

setup(
    name="tmass",
    version="0.1.0",
    description="Distributed T-MASS (CVPR 2024) text-video retrieval: shards, DeepSpeed training, sharded eval",
    packages=find_packages(include=["tmass", "tmass.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "webdataset>=0.2.86",
        "decord>=0.6.0",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "av>=12.0",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={
        "console_scripts": [
            "tmass-build-shards=tmass.shards.cli:main",
            "tmass-train=tmass.cli:train_main",
            "tmass-eval=tmass.cli:eval_main",
            "tmass-export=tmass.cli:export_main",
            "tmass-index=tmass.cli:index_main",
            "tmass-search=tmass.cli:search_main",
        ]
    },
)
