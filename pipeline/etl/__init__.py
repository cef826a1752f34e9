"""The ETL: MIMIC-III tables -> 12-hour bins and a data card (nothing fitted here).

Python API (used by the DAG)::

    from pipeline.etl import EtlSettings, run_etl
    result = run_etl(EtlSettings(mimic_dir="...", out="data/processed"))
"""

from pipeline.etl.run import EtlResult, run_etl
from pipeline.etl.settings import EtlSettings

__all__ = ["EtlResult", "EtlSettings", "run_etl"]
