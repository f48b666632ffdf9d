"""finetune: a base model + a task dataset -> models/finetuned/<task>/.

The logic is lmforge/finetune.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.finetune import STAGE

if __name__ == "__main__":
    STAGE.main()
