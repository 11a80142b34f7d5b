"""Which presets of conf/ a run's params were composed from, and which params differ from them.

The compositions are Hydra's, made as `dvc exp run` makes params.yaml (DVC's
compose_and_dump calls the same `compose`): a preset's defaults list, `_self_`,
`override` and interpolations count exactly as they do there.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's presets (a stage runs from its root)
CONFIG = "config"  # conf/config.yaml: the defaults list
GROUPS = ("dataset", "model")  # conf/config.yaml's defaults, in its order
NO_PRESET = {"dataset": "", "preset": "", "changed": []}
COMPOSE_ERRORS = (OSError, HydraException, OmegaConfBaseException, yaml.YAMLError)


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def unflatten(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def composition(config) -> dict:
    """A composed config as flattened params, interpolations resolved, without Hydra's own node."""
    params = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    return flatten(OmegaConf.to_container(params, resolve=True))


class Presets:
    """conf/'s (data set, model) pairs in the order ties go (the defaults first), and what each composes to.

    A composition costs Hydra about 80 ms of CPU (18 pairs: 1.4 s), so each is made when a run is
    first compared with it, and kept for the other runs of the page; loading composes the defaults.
    """

    def __init__(self, conf_dir: str | Path | None = None):
        self.conf_dir = str(Path(conf_dir or CONF_DIR).resolve())
        with initialize_config_dir(self.conf_dir, version_base=None):
            config = hydra_compose(CONFIG, return_hydra_config=True)
            chosen = config.hydra.runtime.choices
            options = {group: GlobalHydra.instance().config_loader().get_group_options(group) for group in GROUPS}
        # Each group's default first, then by name: ties go to the defaults.
        dataset, model = (sorted(options[g], key=lambda name, g=g: (name != chosen[g], name)) for g in GROUPS)
        self.pairs = [(d, m) for d in dataset for m in model]
        self._composed = {self.pairs[0]: composition(config)}

    def composition(self, pair: tuple[str, str]) -> dict:
        """The flattened params that `dvc exp run -S dataset=... -S model=...` composes."""
        if pair not in self._composed:
            with initialize_config_dir(self.conf_dir, version_base=None):
                config = hydra_compose(CONFIG, overrides=[f"dataset={pair[0]}", f"model={pair[1]}"])
                self._composed[pair] = composition(config)
        return self._composed[pair]


def load_presets(conf_dir: str | Path | None = None) -> Presets | None:
    """conf/'s presets; None when Hydra cannot compose them (no conf/ there, a broken file)."""
    try:
        return Presets(conf_dir)
    except COMPOSE_ERRORS:
        return None


def identify_preset(params: dict, presets: Presets | None) -> dict:
    """The data set and model presets closest to these params, and what differs from them.

    Returns {"dataset", "preset", "changed": [(key, value, preset's value)]}; the composition
    compared with is what `dvc exp run -S +experiment=<preset>` gives (the defaults for the
    MNIST convnet). Empty names without presets.
    """
    if presets is None:
        return dict(NO_PRESET)
    flat = flatten(params)
    best = (presets.pairs[0], None)
    try:
        for pair in presets.pairs:
            changed = differences(flat, presets.composition(pair))
            if best[1] is None or len(changed) < len(best[1]):
                best = (pair, changed)
            if not changed:
                break  # none can be closer, and the pairs come in the order ties go
    except COMPOSE_ERRORS:
        return dict(NO_PRESET)
    (dataset, model), changed = best
    return {"dataset": dataset, "preset": model, "changed": changed}


def differences(flat: dict, reference: dict) -> list[tuple[str, object, object]]:
    """(key, value, reference's value) for every key whose values differ, by key."""
    keys = sorted(set(flat) | set(reference))
    return [(key, flat.get(key), reference.get(key)) for key in keys if flat.get(key) != reference.get(key)]
