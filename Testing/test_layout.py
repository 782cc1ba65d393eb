"""The engine's layout rules: one source for choices and defaults, import rules, no torch where none is needed."""
from __future__ import annotations

from dataclasses import fields

from cotexnet.cli import build_parser
from cotexnet.config import CoTexNetConfig, TrainOptions


def test_cli_train_defaults_are_the_config_defaults():
    """``cotexnet train DATA --out OUT`` runs with exactly the defaults of TrainOptions and CoTexNetConfig."""
    args = vars(build_parser().parse_args(["train", "data", "--out", "out"]))
    flag = {"num_workers": "workers"}
    checked = 0
    for option in fields(TrainOptions):
        name = flag.get(option.name, option.name)
        checked += name in args
        if name in args and args[name] is not None and option.name not in ("data", "out"):
            assert args[name] == option.default, option.name
    assert checked > 15
    for name in ("variant", "clipseg_prompt", "kd_mode", "kl_form", "kd_weight", "alpha_init", "dropout"):
        assert args[name] == CoTexNetConfig.__dataclass_fields__[name].default, name
