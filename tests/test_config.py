import pytest
import yaml

from raysift.jobs.config import load_config, parse_override, to_yaml, validate
from raysift.jobs.core.errors import InputError

from .conftest import REPO, write_config

DEMO = REPO / "configs" / "demo.yaml"


def base(tmp_path):
    return {
        "output_dir": str(tmp_path / "run"),
        "candidates": {"path": "pool.parquet"},
        "targets": {"path": "targets.jsonl"},
    }


def error_of(tmp_path, tree, overrides=()):
    path = write_config(tmp_path / "c.yaml", **tree)
    with pytest.raises(InputError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_demo_config_loads_and_resolves_paths_against_its_folder():
    cfg = load_config(DEMO)
    assert cfg.candidates.path == str(REPO / "demo" / "pool.parquet")
    assert cfg.output_dir == str(REPO / "runs" / "demo")
    assert cfg.select.method == "knn" and cfg.embed.max_length == 128


def test_overrides_are_typed_and_win(tmp_path):
    cfg = load_config(
        DEMO, ["embed.batch_size=128", "select.method=random", "seed=7", f"output_dir={tmp_path}"]
    )
    assert cfg.embed.batch_size == 128 and isinstance(cfg.embed.batch_size, int)
    assert cfg.select.method == "random" and cfg.seed == 7
    assert cfg.output_dir == str(tmp_path)


def test_unknown_key_is_named(tmp_path):
    tree = base(tmp_path) | {"embed": {"batch_sz": 3}}
    assert error_of(tmp_path, tree).endswith("embed.batch_sz: unknown key")


def test_unknown_override_key_is_named(tmp_path):
    msg = error_of(tmp_path, base(tmp_path), ["select.budgett=5"])
    assert "select.budgett: unknown key" in msg


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ({"embed": {"batch_size": 0}}, None, "embed.batch_size"),
        ({"embed": {"max_length": 100000}}, None, "embed.max_length"),
        ({"embed": {"precision": "int4"}}, None, "embed.precision"),
        ({"select": {"method": "magic"}}, None, "select.method"),
        ({"select": {"budget": -1}}, None, "select.budget"),
        ({"seed": -3}, None, "seed"),
        ({"candidates": {"path": "x", "format": "xml"}}, None, "candidates.format"),
    ],
)
def test_range_and_choice_errors_name_the_field(tmp_path, section, value, field):
    msg = error_of(tmp_path, base(tmp_path) | section)
    assert f": {field}: " in msg, msg


def test_missing_required_field(tmp_path):
    tree = base(tmp_path)
    del tree["output_dir"]
    assert "output_dir: required field is missing" in error_of(tmp_path, tree)


def test_actor_pool_that_would_starve_readers_is_refused(tmp_path):
    tree = base(tmp_path) | {
        "ray": {"num_cpus": 2},
        "embed": {"num_actors": 2, "cpus_per_actor": 1},
    }
    assert "must stay below ray.num_cpus" in error_of(tmp_path, tree)


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\nembed: [1,\n")
    with pytest.raises(InputError, match=r"c.yaml: not valid YAML at line \d"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("item", ["embed.batch_size", "=3", "embed.batch_size=[1,"])
def test_malformed_override(item):
    with pytest.raises(InputError, match="--set"):
        parse_override(item)


def test_override_into_a_scalar_is_refused(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path))
    with pytest.raises(InputError, match="seed"):
        load_config(path, ["seed.x=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["select.budget=10"])
    again = validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_evaluate_methods_take_structured_entries(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path))
    cfg = load_config(path, [
        "evaluate.methods=[knn, {method: gradex, options: {strategy: random}}, gradex-all, "
        "{method: tsds, options: {alpha: 0.9}, label: tsds-wide}]"])  # fmt: skip
    entries = cfg.evaluate.methods
    assert [e.name for e in entries] == ["knn", "gradex-random", "gradex-all", "tsds-wide"]
    assert [e.method for e in entries] == ["knn", "gradex", "gradex", "tsds"]
    assert entries[1].options == {"strategy": "random"} and entries[3].options == {"alpha": 0.9}
    with pytest.raises(InputError, match="two entries have one name"):
        load_config(path, ["evaluate.methods=[knn, {method: knn}]"])
    with pytest.raises(InputError, match="evaluate.methods"):
        load_config(path, ["evaluate.methods=[{method: nope}]"])


def test_engine_parameters_are_the_configs():
    """The config's TSDS, index and Sinkhorn sections are built from the engine's dataclasses:
    same defaults, bounds enforced, and `.params()` gives the engine object back."""
    from raysift.engine.params import IndexParams, SinkhornParams, TSDSParams
    from raysift.jobs.config import GOTDConfig, IndexConfig, TSDSConfig

    assert TSDSConfig().params() == TSDSParams()
    assert IndexConfig(kind="ivf", nprobe=3).params() == IndexParams(kind="ivf", nprobe=3)
    gotd = GOTDConfig()
    assert {k: getattr(gotd, k) for k in ("epsilon", "threshold", "momentum", "max_iterations",
            "cache_mb", "block")} == vars(SinkhornParams())  # fmt: skip
    with pytest.raises(ValueError, match="greater than 0"):
        TSDSConfig(alpha=0)
    assert "distance scale" in TSDSConfig.model_fields["C"].description
    # every engine parameter is declared in its section, with the engine's type and default
    import typing

    from raysift.engine.params import config_fields

    for section, params in ((TSDSConfig, TSDSParams), (IndexConfig, IndexParams),
                            (GOTDConfig, SinkhornParams)):  # fmt: skip
        hints = typing.get_type_hints(params)
        for f in config_fields(params):
            declared = section.model_fields[f.name]
            assert declared.annotation == hints[f.name], (section.__name__, f.name)
            assert declared.default == f.default, (section.__name__, f.name)


def test_each_evaluate_entry_gets_its_own_sub_config(tmp_path):
    """Every method of the demo's evaluate (random has no select section), an entry with
    options, and an option the method does not have (one line naming the entry and field)."""
    from raysift.jobs.workflows.evaluate import sub_config

    path = write_config(tmp_path / "c.yaml", **base(tmp_path))
    cfg = load_config(path, [
        "evaluate.methods=[random, knn, tsds, gotd, dsir, gradex, gradex-all, "
        "{method: tsds, options: {alpha: 0.9}, label: wide}, "
        "{method: random, options: {x: 1}}]"])  # fmt: skip
    *good, bad = cfg.evaluate.methods
    for entry in good:
        sub = sub_config(cfg, entry, tmp_path / entry.name, 7)
        assert sub.select.method == entry.method and sub.seed == 7
        assert sub.output_dir == str(tmp_path / entry.name)
    assert sub_config(cfg, good[-1], tmp_path / "w", 0).select.tsds.alpha == 0.9
    assert sub_config(cfg, good[6], tmp_path / "a", 0).select.gradex.strategy == "all"
    assert sub_config(cfg, None, tmp_path / "o", 0).select.method == cfg.select.method
    with pytest.raises(InputError, match="evaluate.methods: random-1: random has no options"):
        sub_config(cfg, bad, tmp_path / "b", 0)
