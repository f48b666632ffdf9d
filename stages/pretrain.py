"""pretrain: data/processed -> models/pretrained/<model>/ (HF format, safetensors) + checkpoints.

The logic is lmforge/pretrain.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.pretrain import STAGE

if __name__ == "__main__":
    STAGE.main()
