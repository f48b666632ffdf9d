"""validate: data/raw -> reports/validation/<dataset>.json + Great Expectations Data Docs.

The logic is lmforge/validate.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.validate import STAGE

if __name__ == "__main__":
    STAGE.main()
