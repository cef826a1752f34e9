"""A tiny synthetic MIMIC-III folder with hand-computed expected bins (for the ETL tests).

Times are hours from 2100-01-01 00:00 (stay 101's intime). Upper-case file names and headers
like the full release; ``lower=True`` writes the demo's lower-case headers instead.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pandas as pd

T0 = pd.Timestamp("2100-01-01 00:00:00")
T2 = pd.Timestamp("2100-02-01 00:00:00")

COLUMNS = {
    "ICUSTAYS": [
        "row_id", "subject_id", "hadm_id", "icustay_id", "dbsource", "first_careunit",
        "last_careunit", "first_wardid", "last_wardid", "intime", "outtime", "los",
    ],
    "CHARTEVENTS": [
        "row_id", "subject_id", "hadm_id", "icustay_id", "itemid", "charttime", "storetime",
        "cgid", "value", "valuenum", "valueuom", "warning", "error", "resultstatus", "stopped",
    ],
    "LABEVENTS": [
        "row_id", "subject_id", "hadm_id", "itemid", "charttime", "value", "valuenum",
        "valueuom", "flag",
    ],
    "INPUTEVENTS_CV": [
        "row_id", "subject_id", "hadm_id", "icustay_id", "charttime", "itemid", "amount",
        "amountuom", "rate", "rateuom", "storetime", "cgid", "orderid", "linkorderid", "stopped",
        "newbottle", "originalamount", "originalamountuom", "originalroute", "originalrate",
        "originalrateuom", "originalsite",
    ],
    "INPUTEVENTS_MV": [
        "row_id", "subject_id", "hadm_id", "icustay_id", "starttime", "endtime", "itemid",
        "amount", "amountuom", "rate", "rateuom", "storetime", "cgid", "orderid", "linkorderid",
        "ordercategoryname", "secondaryordercategoryname", "ordercomponenttypedescription",
        "ordercategorydescription", "patientweight", "totalamount", "totalamountuom",
        "isopenbag", "continueinnextdept", "cancelreason", "statusdescription",
        "comments_editedby", "comments_canceledby", "comments_date", "originalamount",
        "originalrate",
    ],
    "PROCEDUREEVENTS_MV": [
        "row_id", "subject_id", "hadm_id", "icustay_id", "starttime", "endtime", "itemid",
        "value", "valueuom", "location", "locationcategory", "storetime", "cgid", "orderid",
        "linkorderid", "ordercategoryname", "secondaryordercategoryname",
        "ordercategorydescription", "isopenbag", "continueinnextdept", "cancelreason",
        "statusdescription", "comments_editedby", "comments_canceledby", "comments_date",
    ],
}  # fmt: skip


def h(hours: float, base: pd.Timestamp = T0) -> str:
    return str(base + pd.Timedelta(hours=hours))


def _stay(icu, subject, intime, outtime):
    return {"subject_id": subject, "hadm_id": subject * 10 + 1, "icustay_id": icu,
            "intime": intime, "outtime": outtime}  # fmt: skip


def _chart(icu, subject, itemid, t, valuenum, value=None, error=0):
    return {"subject_id": subject, "hadm_id": subject * 10 + 1, "icustay_id": icu,
            "itemid": itemid, "charttime": t, "valuenum": valuenum,
            "value": value if value is not None else valuenum, "error": error}  # fmt: skip


def tables() -> dict[str, list[dict]]:
    """Rows per table. Expected results are in :data:`EXPECTED`."""
    stays = [
        _stay(101, 1, h(0), h(30)),  # 3 bins (CareVue)
        _stay(102, 2, h(0, T2), h(20, T2)),  # 2 bins (MetaVision)
        _stay(103, 3, h(0, T2), h(5, T2)),  # no events: excluded
        _stay(104, 4, h(0, T2), None),  # no outtime: excluded
    ]
    chart = [
        # stay 101, bin 0: HR 80, 100 and 60 (1 h before intime) -> 80; a retracted 200 and an
        # impossible 999 are dropped; one value after outtime is dropped.
        _chart(101, 1, 211, h(1), 80),
        _chart(101, 1, 211, h(11), 100),
        _chart(101, 1, 211, h(-1), 60),
        _chart(101, 1, 211, h(2), 200, error=1),
        _chart(101, 1, 211, h(3), 999),
        _chart(101, 1, 211, h(31), 50),
        _chart(101, 1, 211, h(13), 70),  # bin 1
        # temperature: 98.6 degF -> 37.0; 99.5 in a degC item is degF too -> 37.5; mean 37.25
        _chart(101, 1, 678, h(2), 98.6),
        _chart(101, 1, 676, h(2), 99.5),
        _chart(101, 1, 198, h(5), 15),  # GCS total (CareVue)
        # ventilation: settings at 2, 4, 6 h, extubation at 7 h -> covered 2..7 = 5/12 of bin 0
        _chart(101, 1, 60, h(2), 5),
        _chart(101, 1, 720, h(4), None, value="Assist Control"),
        _chart(101, 1, 60, h(6), 5),
        _chart(101, 1, 640, h(7), None, value="Extubated"),
        _chart(101, 1, 720, h(20), None, value="Other/Remarks"),  # not a ventilation event
        _chart(101, 1, 646, h(25), 45),  # SpO2 in bin 2, clamped to 50
        # stay 102 (MetaVision): GCS 4 + 5 + 6 = 15 at 2 h; eye alone at 3 h is no total
        _chart(102, 2, 220739, h(2, T2), 4),
        _chart(102, 2, 223900, h(2, T2), 5),
        _chart(102, 2, 223901, h(2, T2), 6),
        _chart(102, 2, 220739, h(3, T2), 3),
        _chart(102, 2, 220045, h(1, T2), 90),
        _chart(102, 2, 223761, h(1, T2), 100.4),  # degF -> 38.0
        _chart(102, 2, 223849, h(8, T2), None, value="CMV/ASSIST"),
        _chart(102, 2, 223849, h(10, T2), None, value="CMV/ASSIST"),
        # an item the ETL does not use, with a quoted comma, quote and line break in its value
        _chart(102, 2, 374, h(4, T2), None, value='Leg, "Left"\nLower'),
    ]
    labs = [
        {"subject_id": 1, "hadm_id": 11, "itemid": 50912, "charttime": h(-4), "valuenum": 1.0},
        {"subject_id": 1, "hadm_id": None, "itemid": 50912, "charttime": h(-14), "valuenum": 2.0},
        {"subject_id": 1, "hadm_id": 11, "itemid": 50912, "charttime": h(14), "valuenum": 3.0},
        {"subject_id": 1, "hadm_id": 11, "itemid": 50912, "charttime": h(15), "valuenum": 5.0},
    ]
    cv = [
        {"subject_id": 1, "icustay_id": 101, "charttime": h(12), "itemid": 30047, "rate": 5},
        {"subject_id": 1, "icustay_id": 101, "charttime": h(14), "itemid": 30047, "rate": 0},
        {"subject_id": 1, "icustay_id": 101, "charttime": h(13), "itemid": 30018, "amount": 500,
         "amountuom": "ml"},
    ]  # fmt: skip
    mv = [
        {"subject_id": 2, "icustay_id": 102, "starttime": h(6, T2), "endtime": h(18, T2),
         "itemid": 221906, "amount": 5, "amountuom": "mg", "statusdescription": "FinishedRunning"},
        {"subject_id": 2, "icustay_id": 102, "starttime": h(0, T2), "endtime": h(6, T2),
         "itemid": 221906, "amount": 5, "amountuom": "mg", "statusdescription": "Rewritten"},
        {"subject_id": 2, "icustay_id": 102, "starttime": h(10, T2), "endtime": h(14, T2),
         "itemid": 225158, "amount": 1200, "amountuom": "ml",
         "statusdescription": "FinishedRunning"},
    ]  # fmt: skip
    proc = [
        {"subject_id": 2, "icustay_id": 102, "starttime": h(9, T2), "endtime": h(9, T2),
         "itemid": 227194, "statusdescription": "FinishedRunning"},
    ]  # fmt: skip
    return {
        "ICUSTAYS": stays,
        "CHARTEVENTS": chart,
        "LABEVENTS": labs,
        "INPUTEVENTS_CV": cv,
        "INPUTEVENTS_MV": mv,
        "PROCEDUREEVENTS_MV": proc,
    }


# (icustay_id, bin) -> expected values before preprocessing (None = not observed / absent).
EXPECTED = {
    (101, 0): {"heart_rate": 80.0, "temperature": 37.25, "gcs_total": 15.0, "creatinine": 1.0,
               "mechanical_ventilation": 5 / 12},
    (101, 1): {"heart_rate": 70.0, "creatinine": 4.0, "vasopressor": 2 / 12,
               "iv_fluid_ml": 500.0},
    (101, 2): {"spo2": 50.0},
    (102, 0): {"gcs_total": 15.0, "heart_rate": 90.0, "temperature": 38.0, "vasopressor": 0.5,
               "iv_fluid_ml": 600.0, "mechanical_ventilation": 1 / 12},
    (102, 1): {"vasopressor": 0.5, "iv_fluid_ml": 600.0},
}  # fmt: skip


def write_mimic(
    folder: Path,
    rows: dict[str, list[dict]] | None = None,
    *,
    lower: bool = False,
    gz: bool = True,
    quote_all: bool = False,
) -> Path:
    """Write the tables as CSV (``gz``: ``.csv.gz``) with upper- or lower-case headers.

    ``quote_all`` quotes every field, header included (the full release quotes its header
    and text fields).
    """
    rows = tables() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    for name, cols in COLUMNS.items():
        buf = io.StringIO()
        quoting = csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL
        writer = csv.writer(buf, lineterminator="\n", quoting=quoting)
        writer.writerow([c if lower else c.upper() for c in cols])
        for i, r in enumerate(rows.get(name, [])):
            full = {c: "" for c in cols} | {"row_id": i + 1}
            full.update({k: ("" if v is None else v) for k, v in r.items()})
            writer.writerow([full[c] for c in cols])
        data = buf.getvalue().encode()
        fname = (name.lower() if lower else name) + (".csv.gz" if gz else ".csv")
        if gz:
            (folder / fname).write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / fname).write_bytes(data)
    return folder
