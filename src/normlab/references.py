"""Published numbers, each with its source and its setup, read from references.yaml.

The file ships in the package; `normlab report --references FILE` reads another of the same
form. A number is placed beside the study's at its batch size per device, and is of this
study's setting (`Published.same_setting`) only when the model, the data set, the devices and
the training recipe (epochs and the lr schedule: decay points, lr per image of a device's
batch, warm-up, SyncBN) all match, so that devices × per-device batch, epochs and schedule are
the study's; otherwise it is always shown with its setup ("ImageNet, ResNet-50, 8 GPUs × N
images"), never as if it were this study's. A setting without a `recipe` is never the study's.
`load` checks the whole file and raises NormlabError naming the first problem; the report then
goes on without published numbers (one warning line).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import yamlfile
from .config import RunConfig, brief
from .errors import NormlabError
from .norms import canonical_norm

SOURCE_KEYS = {"name", "cite"}
SETTING_KEYS = {"source", "model", "data", "devices", "setup", "metric", "approx", "recipe", "errors"}
ENTRY_KEYS = {"model", "norm", "batch_size", "error", "where", "note", "recipe"}
# The training recipe of a setting, in run-config fields (an entry's recipe adds to its setting's).
RECIPE_KEYS = {"epochs", "schedule", "step_size", "milestones", "base_lr", "base_batch", "warmup_epochs",
               "warmup_steps", "warmup_shape", "warmup_factor", "sync_bn"}
# Text goes into Markdown tables and figure labels as it is: no control characters and none
# that Markdown, HTML or matplotlib's math would read as syntax.
SYNTAX = re.compile(r"[\x00-\x1f\x7f|<>`$\\\[\]*_~]")


@dataclass(frozen=True)
class Published:
    source: str          # key of the source in the file, e.g. "gn-paper"
    name: str            # short name, e.g. "GN paper"
    cite: str
    model: str
    data: str
    devices: int
    setup: str           # what a reader needs to tell this setting from the study's own
    metric: str
    approx: bool         # read off a figure
    norm: str            # canonical norm spec
    batch_size: int      # images per device
    error: float         # percent
    where: str = ""      # table or figure in the source
    note: str = ""
    recipe: tuple = ()   # (field, value) pairs of a run config: epochs, schedule, lr rule, warm-up

    @property
    def setting(self) -> tuple[str, str, str, int]:
        return (self.source, self.model, self.data, self.devices)

    @property
    def label(self) -> str:
        """'GN paper (ImageNet, ResNet-50, 8 GPUs × N images, ...)': always with its setup."""
        return f"{self.name} ({self.setup})"

    def text(self) -> str:
        """The number as a table shows it: '24.1', or '≈ 9.5' when read off a figure."""
        digits = f"{self.error:.2f}".rstrip("0")
        return ("≈ " if self.approx else "") + (digits + "0" if digits.endswith(".") else digits)

    def same_setting(self, cfg: RunConfig) -> bool:
        """Whether a run of config `cfg` is in this number's setting: same model, data set and
        devices, and the same recipe (`recipe_of`). The batch per device is matched where the
        number is placed (beside the study's at the same batch size per device)."""
        if not self.recipe or (self.model, self.data, self.devices) != (cfg.model, cfg.data, cfg.virtual_gpus):
            return False
        return recipe_of(RunConfig(**dict(self.recipe))) == recipe_of(cfg)


def recipe_of(cfg: RunConfig) -> tuple:
    """What makes two runs' training the same beyond model, data and devices: epochs, the lr
    schedule (decay points; lr per image of a device's batch, the linear scaling rule's slope),
    the warm-up, and BN's statistics over one device or all."""
    decay = {"step": cfg.step_size, "multistep": tuple(cfg.milestones), "cosine": None}[cfg.schedule]
    warm = (cfg.warmup_epochs, cfg.warmup_steps, cfg.warmup_shape, round(cfg.warmup_factor, 12)) \
        if cfg.warmup_epochs or cfg.warmup_steps else None
    return (cfg.epochs, cfg.schedule, decay, round(cfg.base_lr / cfg.base_batch, 15), warm, cfg.sync_bn)


def default_path():
    return resources.files("normlab").joinpath("references.yaml")


def load(path: str | Path | None = None) -> list[Published]:
    """Every published number in the file (the package's own by default), checked."""
    where = str(path) if path is not None else "normlab/references.yaml"
    try:
        data = yamlfile.read(path) if path is not None else yamlfile.load(default_path().read_text(encoding="utf-8"), where)
    except (OSError, UnicodeDecodeError) as err:
        raise NormlabError(f"cannot read {where} ({getattr(err, 'strerror', None) or err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict) \
            or not isinstance(data.get("settings"), list):
        raise NormlabError(f"{where}: expected a mapping with 'sources' (name -> name, cite) and "
                           f"'settings' (a list)")
    sources = {}
    if not all(isinstance(key, str) for key in data["sources"]):
        raise NormlabError(f"{where}: the names of 'sources' must be text")
    for key, source in data["sources"].items():
        check_keys(source, SOURCE_KEYS, SOURCE_KEYS, f"{where}: source '{key}'")
        sources[key] = {k: text_field(source, k, f"{where}: source '{key}'") for k in SOURCE_KEYS}
    out, seen = [], set()
    for i, setting in enumerate(data["settings"], 1):
        at = f"{where}: setting {i}"
        check_keys(setting, SETTING_KEYS, SETTING_KEYS - {"model", "recipe"}, at)
        if not isinstance(setting["source"], str) or setting["source"] not in sources:
            raise NormlabError(f"{at}: unknown source '{setting['source']}'; known: {', '.join(sources)}")
        if not isinstance(setting["errors"], list) or not setting["errors"]:
            raise NormlabError(f"{at}: 'errors' must be a non-empty list")
        for j, entry in enumerate(setting["errors"], 1):
            here = f"{at}, error {j}"
            check_keys(entry, ENTRY_KEYS, {"norm", "batch_size", "error"}, here)
            merged = {**setting, **entry}
            if "model" not in merged:
                raise NormlabError(f"{here}: no 'model' (give it in the setting or in the entry)")
            published = Published(
                source=setting["source"], name=sources[setting["source"]]["name"],
                cite=sources[setting["source"]]["cite"],
                model=text_field(merged, "model", here).lower(), data=text_field(merged, "data", here).lower(),
                devices=whole(merged, "devices", here), setup=text_field(merged, "setup", here),
                metric=text_field(merged, "metric", here), approx=flag(merged, "approx", here),
                norm=norm_field(merged, here), batch_size=whole(merged, "batch_size", here),
                error=percent(merged, here), where=text_field(merged, "where", here, optional=True),
                note=text_field(merged, "note", here, optional=True),
                recipe=recipe_field({**(setting.get("recipe") or {}), **(entry.get("recipe") or {})}, here))
            key = published.setting + (published.norm, published.batch_size)
            if key in seen:
                raise NormlabError(f"{here}: a second number for {published.norm} at batch "
                                   f"{published.batch_size} in the same setting")
            seen.add(key)
            out.append(published)
    return out


def check_keys(value, known: set, required: set, where: str) -> None:
    if not isinstance(value, dict):
        raise NormlabError(f"{where}: expected a mapping")
    unknown = sorted(set(value) - known)
    if unknown:
        raise NormlabError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(known))}")
    missing = sorted(required - set(value))
    if missing:
        raise NormlabError(f"{where}: missing '{missing[0]}'")


def recipe_field(recipe, where: str) -> tuple:
    """A recipe as sorted (field, value) pairs, checked as run-config fields."""
    if not isinstance(recipe, dict):
        raise NormlabError(f"{where}: 'recipe' must be a mapping of run settings, e.g. "
                           f"{{epochs: 100, schedule: step, step_size: 30}}")
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise NormlabError(f"{where}: unknown recipe key '{unknown[0]}'; known: {', '.join(sorted(RECIPE_KEYS))}")
    cfg = RunConfig.from_dict(recipe, where=f"{where}: recipe")
    try:
        recipe_of(cfg)
    except KeyError:
        raise NormlabError(f"{where}: recipe: unknown schedule '{cfg.schedule}'; use step, multistep or cosine") from None
    return tuple(sorted((k, getattr(cfg, k)) for k in recipe))


def text_field(values: dict, key: str, where: str, optional: bool = False) -> str:
    value = values.get(key, "" if optional else None)
    if not isinstance(value, str) or not (value.strip() or optional) or len(value) > 500:
        raise NormlabError(f"{where}: '{key}' must be a non-empty text of at most 500 characters, got "
                           f"{brief(value)}")
    if SYNTAX.search(value):
        raise NormlabError(f"{where}: '{key}' holds {SYNTAX.search(value).group()!r}; write plain text "
                           f"(no control characters, none of | < > ` $ \\ [ ] * _ ~)")
    return value.strip()


def whole(values: dict, key: str, where: str) -> int:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NormlabError(f"{where}: '{key}' must be a positive whole number, got {brief(value)}")
    return value


def flag(values: dict, key: str, where: str) -> bool:
    if not isinstance(values.get(key), bool):
        raise NormlabError(f"{where}: '{key}' must be true or false, got {brief(values.get(key))}")
    return values[key]


def percent(values: dict, where: str) -> float:
    value = values.get("error")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:  # NaN too
        raise NormlabError(f"{where}: 'error' must be a percentage between 0 and 100, got {brief(value)}")
    return float(value)


def norm_field(values: dict, where: str) -> str:
    try:
        return canonical_norm(str(values.get("norm")))
    except NormlabError as err:
        raise NormlabError(f"{where}: {err}") from None


def for_model(published: list[Published], model: str) -> list[Published]:
    """The numbers to set beside a study of `model`: per source, those of the same model if
    the source has any, otherwise those of the source's only model (labelled with its setup);
    a source with several other models (He et al.'s depths) contributes none."""
    out = []
    for source in dict.fromkeys(p.source for p in published):
        mine = [p for p in published if p.source == source]
        models = {p.model for p in mine}
        if model in models:
            out += [p for p in mine if p.model == model]
        elif len(models) == 1:
            out += mine
    return out


def settings(published: list[Published]) -> dict[tuple, list[Published]]:
    """Setting -> its numbers, in file order."""
    out: dict[tuple, list[Published]] = {}
    for p in published:
        out.setdefault(p.setting, []).append(p)
    return out


def find(published: list[Published], norm: str, batch_size: int) -> Published | None:
    """The number for exactly this norm and batch size (in one setting's list), if any."""
    return next((p for p in published if p.norm == norm and p.batch_size == batch_size), None)
