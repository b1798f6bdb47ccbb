"""vllm_jax: video LLMs in JAX/Flax. `pip install -e '.[dev]'` for tests and PyTorch converters."""

from setuptools import setup

setup(
    name="vllm_jax",
    version="0.1.0",
    description="Video-LLaMA, Video-LLaVA and LLaMA-VID in JAX/Flax, sharded for TPU pods and GPU clusters",
    python_requires=">=3.11",
    packages=["vllm_jax", "vllm_jax.nn", "vllm_jax.models", "vllm_jax.data", "vllm_jax.train",
              "vllm_jax.systems", "vllm_jax.cli", "vllm_jax.eval", "vllm_jax.serve", "vllm_jax.converters", "vllm_jax.configs"],
    package_dir={"vllm_jax": "vllm_jax", "vllm_jax.converters": "converters", "vllm_jax.configs": "configs"},
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1",
        "einops>=0.8",
        "numpy>=1.26",
        "scipy>=1.11",
        "ml_dtypes>=0.5",
        "tqdm>=4.66",
        "transformers>=5.0,<6",
        "tokenizers>=0.22",
        "sentencepiece>=0.2",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "decord>=0.6.0",
        "av>=14",
        "soundfile>=0.13",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        # gs:// (and any fsspec URL) for every path: etils.epath over gcsfs, as orbax reads and writes
        # checkpoints; google-cloud-storage carries tensorboardX's gs:// event writer.
        "etils[epath]>=1.7",
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14",
        "pillow>=10",
        "matplotlib>=3.8",  # the demo's report picture
        # `vllm-jax serve`: OpenAI's API on FastAPI/uvicorn, Prometheus metrics.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2.6",
        "prometheus-client>=0.20",
    ],
    extras_require={
        # PyTorch side: reading .bin/.pth checkpoints and the parity references.
        "torch": ["torch>=2.4", "safetensors>=0.4"],
        # Viewing the training logs: `tensorboard --logdir <workdir>/tensorboard`.
        "tensorboard": ["tensorboard>=2.15"],
        # The chat page in the browser: `vllm-jax web`.
        "web": ["gradio>=6.31"],
        # The field's harness: `lmms-eval --model vllm_jax --model_args model=DIR ...`.
        "lmms-eval": ["lmms-eval>=0.7.3"],
        "dev": ["torch>=2.4", "safetensors>=0.4", "pytest>=8", "pytest-xdist>=3.6",
                "kaldi-native-fbank>=1.20",
                "gcp-storage-emulator>=2024.8",  # gs:// tests against a local Cloud Storage emulator
                "openai>=1.40"],  # the server's tests use OpenAI's own client
    },
    entry_points={"console_scripts": ["vllm-jax=vllm_jax.cli:main"],
                  "lmms_eval.models": ["vllm_jax=vllm_jax.eval.lmms:manifest"]},
)
