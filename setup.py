from setuptools import find_packages, setup

setup(
    name="moe_plugin",
    version="0.1.0",
    description="Sparse Mixture-of-Experts language models as a fairseq --user-dir plugin",
    packages=find_packages(include=["moe_plugin", "moe_plugin.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "fairscale==0.4.13",
        "sacrebleu",
        # fairseq 0.12 uses np.compat (removed in numpy 2) in its LM data path: generation
        # and --sample-break-mode eos need numpy 1.x.
        "numpy>=1.26.4,<2",
        "scipy",
    ],
    extras_require={"test": ["pytest", "hypothesis"], "plots": ["matplotlib"]},
)
