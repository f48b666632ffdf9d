"""preprocess: data/raw + reports/validation -> data/processed/ (tokenizer, packed blocks, task datasets).

The logic is lmforge/preprocess.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.preprocess import STAGE

if __name__ == "__main__":
    STAGE.main()
