"""ingest: sources -> data/raw/<dataset>/{train,val,test}.parquet + manifest.json, and data/raw/corpus/.

The logic is lmforge/ingest.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.ingest import STAGE

if __name__ == "__main__":
    STAGE.main()
