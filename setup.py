from setuptools import setup

setup(
    name="relaxedconv",
    version="0.1.0",
    description="Fast, learnable relaxed equivariance for PyTorch: non-stationary continuous group "
    "convolutions with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["relaxedconv", "relaxedconv.kernels", "relaxedconv.training", "relaxedconv.benchmark"],
    # docs/design.md §6: the Triton kernels live in kernels/ and install as relaxedconv.kernels.
    package_dir={"relaxedconv.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pillow"],
        "data": ["pillow"],
        "plots": ["matplotlib"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],  # relaxedconv export --onnx, and its tests
    },
    entry_points={"console_scripts": ["relaxedconv=relaxedconv.cli:main"]},
)
