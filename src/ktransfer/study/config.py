"""A study's config: typed models (pydantic) of the YAML/JSON file, and the runs it plans.

Every key is checked when the config is read: unknown keys, wrong types and out-of-range values
fail with one line that names the key (``methods[1].lr: must be greater than 0; got -1.0``).
Shorthands are accepted where a user would write them: a method or a data source by its name
alone, a single value where a list is meant, ``a, b`` for a list.

(About 490 lines: one model per section of the file with its checks and messages, kept together so a
key's rules read in one place; the planned runs are in :mod:`ktransfer.study.plan`.)
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Annotated, Any, Literal

from ..augment import AUGMENTS
from ..extras import TRACKERS
from ..controls import CONTROLS, check_controls
from ..data.base import ImageData, stratified_split
from ..errors import ConfigError
from ..extras import require
from ..methods import create_method
from ..settings import TransferSettings
from ..targets import refuse_view_options, resolve_targets
from .sources import DATA_SOURCES, StudyData, same_images
from .store import CONFIG_FILE

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationError, field_validator, model_validator


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Count = Annotated[StrictInt, Field(ge=1)]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # lax: YAML reads 1e-3 (no dot) as a string; a number is meant


def _model_spec(spec: str) -> str:
    if spec != "zoo:*" and ":" not in spec:
        raise ValueError(f"model spec {spec!r} has no source; write it as SOURCE:NAME, e.g. zoo:cnn (or zoo:* for the whole zoo)")
    return spec


ModelSpec = Annotated[Text, AfterValidator(_model_spec)]


def _as_list(value: Any) -> Any:
    """One value where a list is meant, or ``a, b``: the list the user meant."""
    if value is None:
        return []
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()] if "," in value else [value]
    return value if isinstance(value, list) else [value]


class _Section(BaseModel):
    """A part of the config: unknown keys are refused, naming the ones allowed."""

    model_config = ConfigDict(extra="forbid", validate_default=False)

    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return value

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> Any:
        value = cls._shorthand(value)
        if isinstance(value, dict):
            unknown = sorted(map(str, set(value) - set(cls.model_fields)))
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(cls.model_fields))}")
        return value


def _where(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_MESSAGES = {
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "string_too_short": "expected a non-empty string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def config_error(exc: ValidationError, source: str) -> ConfigError:
    """The first problem pydantic found, as one line that names the key."""
    error = exc.errors(include_url=False)[0]
    kind, ctx, where = error["type"], error.get("ctx") or {}, _where(error["loc"]) or source
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    elif kind == "greater_than_equal":
        message = f"must be at least {ctx['ge']}; got {error['input']!r}"
    elif kind == "greater_than":
        message = f"must be greater than {ctx['gt']}; got {error['input']!r}"
    elif kind == "less_than":
        message = f"must be less than {ctx['lt']}; got {error['input']!r}"
    elif kind == "literal_error":
        expected = str(ctx["expected"]).replace("'", "")
        message = f"must be {expected}; got {error['input']!r}"
    elif kind in _MESSAGES:
        message = f"{_MESSAGES[kind]}; got {error['input']!r}"
    else:
        message = error["msg"][:1].lower() + error["msg"][1:]
    return ConfigError(f"{where}: {message}")


def _validate(cls, value: Any, where: str):
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise config_error(exc, where) from None


class DataConfig(_Section):
    """Where the data comes from. ``transfer_size``/``eval_size`` take a seeded stratified subset (for quick studies).

    ``setting`` (Fashion-MNIST only) chooses the transfer data: ``paper``, a stratified 20% of the
    zoo's own training pool; ``new-data``, the 10k validation images the zoo never saw.
    """

    source: Text = "fashion-mnist"
    dir: str | None = None
    transfer_size: Count | None = None
    eval_size: Count | None = None
    seed: StrictInt = 0
    setting: Literal["paper", "new-data"] = "paper"

    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            return {"source": value}
        if not isinstance(value, dict):
            raise ValueError("give a source name such as 'fashion-mnist' or a mapping with keys source, dir, transfer_size, eval_size, seed, setting")
        return value

    @field_validator("dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source.partition(":")[0] not in DATA_SOURCES:
            raise ValueError(f"unknown data source {source!r}; known: {', '.join(sorted(DATA_SOURCES))} (folder as folder:PATH, Hugging Face datasets as hf-disk:PATH or hf-imagefolder:PATH)")
        return source

    @classmethod
    def parse(cls, value, data_dir: str | None = None, where: str = "data") -> "DataConfig":
        config = _validate(cls, value, where)
        if data_dir is not None:
            config.dir = str(data_dir)
        return config

    @property
    def scheme(self) -> str:
        return self.source.partition(":")[0]

    def load(self, guard: bool = False) -> StudyData:
        """The transfer and evaluation data (and the guard's validation data, where the source has some).

        Refuses data that would score a run on images it trained on or selected with: a transfer
        set that is the evaluation set, and with ``guard`` a validation set that is the evaluation set.
        """
        loaded = DATA_SOURCES[self.scheme](self)
        transfer_set, eval_set = loaded[:2]
        validation = loaded[2] if len(loaded) > 2 else None
        if same_images(transfer_set, eval_set):
            raise ConfigError(f"data: the transfer data {transfer_set.name} is the evaluation data; evaluate on other images (e.g. source fashion-mnist, the test set) or transfer on others")
        if guard and validation is not None and same_images(validation, eval_set):
            raise ConfigError(
                f"data: the guard selects on {validation.name}, which is also the evaluation data; evaluate on other images "
                "(source fashion-mnist, the test set) or leave guard out"
            )
        transfer_set = self._shrink(transfer_set, self.transfer_size)
        eval_set = self._shrink(eval_set, self.eval_size)
        return StudyData(transfer_set, eval_set, validation if guard else None)

    def _shrink(self, data: ImageData, size: int | None) -> ImageData:
        if size is None or size >= len(data):
            return data
        chosen, _ = stratified_split(data.labels, size, self.seed)
        return data.subset(chosen, f"{data.name}[{size},seed={self.seed}]")

    def describe(self) -> dict:
        """What determines the data of a run (the folder is left out: the same files elsewhere are the same data)."""
        described = {"source": self.source, "transfer_size": self.transfer_size, "eval_size": self.eval_size, "seed": self.seed}
        if self.setting != "paper":  # only then, so that runs stored before settings existed keep their keys
            described["setting"] = self.setting
        return described


class MethodConfig(_Section):
    """One method; ``lr`` and each hyperparameter hold one value or several (a grid to search)."""

    name: Text
    lr: list[Rate] = Field(default_factory=list)  # empty: the top-level lr, else the method's paper default
    params: dict[str, list] = Field(default_factory=dict)

    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, dict):
            raise ValueError("give a method name or a mapping with keys name, lr, params")
        value = dict(value)
        if "lr" in value:
            value["lr"] = _as_list(value["lr"])
        params = value.get("params")
        if params is None:
            value.pop("params", None)
        elif isinstance(params, dict):
            value["params"] = {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in params.items()}
        return value

    @field_validator("params")
    @classmethod
    def _non_empty(cls, params: dict[str, list]) -> dict[str, list]:
        for key, values in params.items():
            if not values:
                raise ValueError(f"params.{key}: the list of values is empty")
        return params

    @model_validator(mode="after")
    def _method_accepts(self) -> "MethodConfig":
        for setting in self.settings(default_lr=1.0):
            try:
                create_method(self.name, **setting["params"])  # unknown names and bad values fail now, not mid-study
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    def settings(self, default_lr: float | None) -> list[dict]:
        """Every combination: ``{"lr": ..., "params": {...}}`` in grid order."""
        lrs = self.lr or [default_lr if default_lr is not None else create_method(self.name).default_lr]
        keys = sorted(self.params)
        combos = itertools.product(*(self.params[k] for k in keys)) if keys else [()]
        out = []
        for combo in combos:
            params = dict(zip(keys, combo))
            for lr in lrs:
                out.append({"lr": lr, "params": params})
        return out

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        if self.lr:
            out["lr"] = self.lr[0] if len(self.lr) == 1 else list(self.lr)
        if self.params:
            out["params"] = {k: v[0] if len(v) == 1 else list(v) for k, v in self.params.items()}
        return out


class SearchConfig(_Section):
    """The hyperparameter search: ``pairs`` is a count (drawn with ``seed`` from the study's pairs) or a list of [student, teacher]."""

    pairs: Count | list[tuple[Text, Text]] = 3
    holdout: float = Field(0.2, gt=0, lt=1)  # the held-out share of the transfer data
    seed: StrictInt = 0
    epochs: Count | None = None

    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ValueError("expected a mapping with keys pairs, holdout, seed, epochs")
        pairs = value.get("pairs", 3)
        if not ((isinstance(pairs, int) and not isinstance(pairs, bool)) or (isinstance(pairs, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs))):
            raise ValueError(f"pairs: expected a count or a list of [student, teacher]; got {pairs!r}")
        return value

    def to_dict(self) -> dict:
        return {"pairs": self.pairs if isinstance(self.pairs, int) else [list(p) for p in self.pairs], "holdout": self.holdout, "seed": self.seed, "epochs": self.epochs}


EXECUTORS = ("local", "processes", "ray")
# The settings of ktransfer.TransferSettings a study refuses, and the one it spells as a list.
_CHECKPOINTS = "a study resumes by its store (a rerun redoes only the runs not finished), not by per-run checkpoints; leave it out"
STUDY_REFUSES = {key: _CHECKPOINTS for key in ("checkpoint_dir", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints")}
STUDY_LISTS = {"seed": "seeds"}  # a study runs every seed of a list
# The fields a RunSpec has always held (its key is made of them); every other setting a study config sets at
# its top level: those that change a run's result enter its key where not the default, the speed switches do not.
_RUN_SPEC_SETTINGS = ("epochs", "lr", "batch_size", "seed", "targets", "augment", "guard", "device")
IDENTITY_EXTRAS = tuple(name for name in TransferSettings().identity() if name not in _RUN_SPEC_SETTINGS)
RUNTIME_SETTINGS = tuple(name for name in TransferSettings.names() if name not in (*TransferSettings().identity(), *_RUN_SPEC_SETTINGS, *STUDY_REFUSES))


class StudyConfig(_Section):
    name: Text = "study"
    students: list[ModelSpec] = Field(default_factory=list)
    teachers: list[ModelSpec] | None = None  # left out: the students teach each other
    methods: list[MethodConfig] = Field(default_factory=list)
    seeds: list[StrictInt] = Field(default_factory=lambda: [0])
    epochs: Count = 3
    lr: Rate | None = None
    batch_size: Count = 128
    data: DataConfig = Field(default_factory=DataConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    targets: Literal["cached", "online", "views"] | None = None  # left out: cached, or online with augmentation; views: cached per augmented view
    augment: Text = "none"
    device: Text = "cpu"
    # Every run (transfers and controls) returns the best of the original student and each epoch's student on
    # the validation data (the source's validation split; without one a held-out share of the transfer data).
    guard: bool = False
    # The other settings of every run (ktransfer.TransferSettings); left out (None), the transfer's default.
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: Literal["constant", "cosine"] | None = None
    cache_dtype: Literal["float16", "float32"] | None = None
    cache_top_k: StrictInt | None = Field(None, ge=0)
    guard_holdout: float | None = Field(None, gt=0, lt=1)
    amp: bool = False
    amp_frozen: bool = False
    channels_last: Literal["auto", "on", "off"] = "auto"
    prefetch: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    eval_every: StrictInt = Field(1, ge=0)  # score the evaluation data after every N-th epoch and the last (0: the last only)
    # Run once per student, learning rate and seed, beside the transfers: see ktransfer.controls.
    controls: list[Text] = Field(default_factory=lambda: list(CONTROLS))
    # Where the runs execute: in this process one after another, in worker processes of this machine
    # (cpus_per_run threads each), or as Ray tasks (docs/scale.md).
    executor: Literal["local", "processes", "ray"] = "local"
    cpus_per_run: float = Field(1.0, gt=0, allow_inf_nan=False)
    gpus_per_run: float = Field(0.0, ge=0, allow_inf_nan=False)  # fractions let small models share a card
    max_retries: StrictInt = Field(2, ge=0)  # a run whose worker process dies is tried again this often
    # Experiment trackers every run is sent to (ktransfer.tracking; local ones write into the study's folder).
    log: list[Literal[TRACKERS]] = Field(default_factory=list)

    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        value = dict(value)
        for key in STUDY_REFUSES:
            if key in value:
                raise ValueError(f"{key}: {STUDY_REFUSES[key]}")
        for key in ("students", "teachers", "methods", "seeds", "controls"):
            if value.get(key) is not None:
                value[key] = _as_list(value[key])
        if value.get("data") is None:
            value.pop("data", None)
        return value

    @field_validator("augment")
    @classmethod
    def _augment(cls, augment: str) -> str:
        if augment not in AUGMENTS:
            raise ValueError(f"must be {' or '.join(AUGMENTS)}; got {augment!r}")
        return augment

    @field_validator("controls")
    @classmethod
    def _controls(cls, controls: list[str]) -> list[str]:
        try:
            return check_controls(controls)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _whole(self) -> "StudyConfig":
        from ..models.store import zoo_names

        def expand(specs: list[str]) -> list[str]:
            return list(dict.fromkeys(s for spec in specs for s in ([f"zoo:{n}" for n in zoo_names()] if spec == "zoo:*" else [spec])))

        self.students = expand(self.students)
        if not self.students:
            raise ValueError("'students' is missing or empty; list model specs such as [zoo:cnn, zoo:vit] or zoo:*")
        self.teachers = expand(self.teachers) if self.teachers is not None else list(self.students)
        if not self.methods:
            raise ValueError("'methods' is missing or empty; list methods such as [kl, kl_dp] (see 'ktransfer methods')")
        names = [m.name for m in self.methods]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"method {name} is listed twice; a study uses one setting per method, so give one entry with lists of values to search over")
        if not self.seeds:
            raise ValueError("'seeds' is empty; give at least one, e.g. [0]")
        self.seeds = list(dict.fromkeys(self.seeds))
        try:
            self.targets = resolve_targets(self.targets, self.augment)
            refuse_view_options(self.targets, self.cache_dtype, self.cache_top_k)
            TransferSettings(**self.run_settings(), **self.runtime_settings())  # every combination checked now, not in the first run
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if not self.pairs():
            raise ValueError("no pair has a student different from its teacher; add more models")
        return self

    @classmethod
    def from_dict(cls, raw: dict, default_name: str = "study", data_dir: str | None = None, source: str = "config") -> "StudyConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a study config is a mapping of keys ({', '.join(sorted(cls.model_fields))}); got {type(raw).__name__}")
        config = _validate(cls, {"name": default_name, **raw}, source)
        if data_dir is not None:
            config.data.dir = str(data_dir)
        return config

    @classmethod
    def load(cls, path: str | Path, data_dir: str | None = None) -> "StudyConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no study config at {path}; write one (see examples/zoo-study.yaml) or give a study folder that holds {CONFIG_FILE}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        else:
            yaml = require("yaml", "study", "reading a YAML study config")
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        default_name = path.parent.name if path.name == CONFIG_FILE else path.stem
        return cls.from_dict(raw or {}, default_name=default_name, data_dir=data_dir, source=str(path.name))

    def to_dict(self) -> dict:
        data = {"source": self.data.source, **({"dir": self.data.dir} if self.data.dir else {}), **{k: v for k, v in self.data.describe().items() if k != "source" and v is not None}}
        out = {
            "name": self.name, "students": list(self.students), "teachers": list(self.teachers),
            "methods": [m.to_dict() for m in self.methods], "seeds": list(self.seeds), "epochs": self.epochs,
            "batch_size": self.batch_size, "data": data, "targets": self.targets, "device": self.device, "controls": list(self.controls),
        }
        if self.augment != "none":
            out["augment"] = self.augment
        if self.guard:
            out["guard"] = True
        if self.lr is not None:
            out["lr"] = self.lr
        if self.searched_methods():
            out["search"] = self.search.to_dict()
        defaults = StudyConfig.model_fields
        out.update(self.run_settings())
        out.update(self.runtime_settings())
        for key in ("executor", "cpus_per_run", "gpus_per_run", "max_retries"):
            if getattr(self, key) != defaults[key].default:
                out[key] = getattr(self, key)
        return out

    def pairs(self) -> list[tuple[str, str]]:
        return [(s, t) for s in self.students for t in self.teachers if s != t]

    def run_settings(self) -> dict:
        """The settings beyond the run key's own fields that change a run's result, where not the default (so older keys stay)."""
        given = {key: getattr(self, key) for key in IDENTITY_EXTRAS}
        defaults = TransferSettings()
        return {key: value for key, value in given.items() if value is not None and value != getattr(defaults, key)}

    def runtime_settings(self) -> dict:
        """The settings that change only how fast a run goes (not its result, beyond rounding): not part of a run's key."""
        return {key: getattr(self, key) for key in RUNTIME_SETTINGS if getattr(self, key) != StudyConfig.model_fields[key].default}

    def method(self, name: str) -> MethodConfig:
        return next(m for m in self.methods if m.name == name)

    def settings(self, method: MethodConfig) -> list[dict]:
        return method.settings(self.lr)

    def searched_methods(self) -> list[MethodConfig]:
        return [m for m in self.methods if len(self.settings(m)) > 1]

    def search_pairs(self) -> list[tuple[str, str]]:
        if not isinstance(self.search.pairs, int):
            return [tuple(p) for p in self.search.pairs]
        pairs = self.pairs()
        if self.search.pairs >= len(pairs):
            return pairs
        return sorted(random.Random(self.search.seed).sample(pairs, self.search.pairs), key=pairs.index)

    def models(self) -> list[str]:
        extra = [m for pair in (self.search_pairs() if self.searched_methods() else []) for m in pair]
        return list(dict.fromkeys([*self.students, *self.teachers, *extra]))
