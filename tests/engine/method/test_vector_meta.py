"""A vector's typed metadata and its two schemas (deftx_engine/method/vector_meta.py): schema 2 round-trips every typed
field, a schema-1 file (written here by hand, keys in "extra") still loads, unknown keys are kept, a newer schema
and mistyped fields are refused naming the field."""
import json

import pytest
import torch

from deftx_engine.errors import VectorError
from deftx_engine.method.vector_meta import FORMAT, SCHEMA_VERSION, Component, HeadFit, VectorMeta
from deftx_engine.method.vectors import CONFIG_FILE, SparseVector, compose


def language_vector(meta: VectorMeta) -> SparseVector:
    vec = SparseVector(meta, indices={"w": torch.tensor([1, 7], dtype=torch.int32)},
                       values={"w": torch.tensor([0.5, -0.25])}, shapes={"w": (2, 5)})
    vec.meta.k = vec.nnz
    return vec


HELD = {"lines": 40, "theta0": {"loss": 5.0, "accuracy": 0.1}, "theta0+phi": {"loss": 4.0, "accuracy": 0.2},
        "encoder_only": {"loss": 4.5, "accuracy": 0.15}}
FIT = {"heldout": {"loss": 3.5, "accuracy": 0.25, "n": 12}, "steps": 30, "layer": None, "n_lines": 400}


def full_meta() -> VectorMeta:
    return VectorMeta(kind="language", base_model="m", base_fingerprint="fp", language="jv", method="deftx",
                      denoise={"rank_policy": "energy", "energy": 0.9}, train={"data": "c.txt", "seed": 3},
                      n_maskable=1000, heldout_mlm=HELD, mlm_head=HeadFit(**FIT), metrics={"jv": {"f1": 0.5}},
                      components=[Component("task", "en", "lt-sft", 1.0), Component("language", "jv", "deftx")],
                      ties={"density": 0.2, "lambda": 1.0}, converted_from="composable-sft",
                      skipped_parameters=["cls.bias"], license="mit", extra={"note": [1, 2]}, k=2)


def test_every_typed_field_round_trips_under_the_schema_version(tmp_path):
    folder = language_vector(full_meta()).save(tmp_path / "v")
    written = json.loads((folder / CONFIG_FILE).read_text())
    assert written["schema_version"] == SCHEMA_VERSION == 2
    assert written["n_maskable"] == 1000 and written["mlm_head"] == FIT and written["extra"] == {"note": [1, 2]}
    assert written["components"][1] == {"kind": "language", "language": "jv", "method": "deftx", "scale": None}
    loaded = SparseVector.load(folder).meta
    assert loaded == full_meta()
    assert isinstance(loaded.mlm_head, HeadFit) and all(isinstance(c, Component) for c in loaded.components)


def test_a_schema_1_file_with_its_keys_in_extra_loads_into_the_typed_fields(tmp_path):
    """What DeFT-X wrote before schema 2, by hand: no schema_version, every key below in "extra"."""
    folder = language_vector(full_meta()).save(tmp_path / "v")
    old = {"format": FORMAT, "kind": "language", "base_model": "m", "base_fingerprint": "fp", "language": "jv",
           "label_names": [], "method": "deftx", "denoise": {"rank_policy": "energy", "energy": 0.9}, "k": 2,
           "engine_version": "0.1.0", "shapes": {"w": [2, 5]},
           "extra": {"train": {"data": "c.txt", "seed": 3}, "n_maskable": 1000, "heldout_mlm": HELD, "mlm_head": FIT,
                     "metrics": {"jv": {"f1": 0.5}}, "ties": {"density": 0.2, "lambda": 1.0},
                     "components": [{"kind": "task", "language": "en", "method": "lt-sft", "scale": 1.0},
                                    {"kind": "language", "language": "jv", "method": "deftx"}],
                     "converted_from": "composable-sft", "skipped_parameters": ["cls.bias"], "license": "mit",
                     "note": [1, 2]}}
    (folder / CONFIG_FILE).write_text(json.dumps(old))
    vec = SparseVector.load(folder)
    assert vec.meta == full_meta()  # the known keys are typed fields; "note" stays in extra
    assert vec.meta.extra == {"note": [1, 2]} and vec.meta.mlm_head.n_lines == 400
    vec.save(tmp_path / "again")  # and is written back in the current schema
    again = json.loads((tmp_path / "again" / CONFIG_FILE).read_text())
    assert again["schema_version"] == 2 and again["n_maskable"] == 1000 and again["extra"] == {"note": [1, 2]}


def test_the_keys_of_schema_1_given_in_extra_become_fields_in_memory_too():
    """The trainer and older callers still pass them in ``extra``: the record is the same."""
    meta = VectorMeta(kind="task", base_model="m", base_fingerprint="fp",
                      extra={"n_maskable": 5, "mlm_head": FIT, "components": [{"kind": "task"}], "part": "lower"})
    assert meta.n_maskable == 5 and meta.mlm_head == HeadFit(**FIT) and meta.components == [Component("task")]
    assert meta.extra == {"part": "lower"}


def test_compose_records_its_components_as_typed_records():
    a = language_vector(VectorMeta(kind="language", base_model="m", base_fingerprint="fp", language="jv"))
    both = compose([a, a], scales=[1.0, 0.5])
    assert both.meta.components == [Component("language", "jv", "deftx", 1.0),
                                    Component("language", "jv", "deftx", 0.5)]


@pytest.mark.parametrize("edit, says", [
    ({"schema_version": 3}, r"newer DeFT-X \(vector schema 3; this version reads up to 2\)"),
    ({"schema_version": "2"}, "field 'schema_version' must be a whole number"),
    ({"n_maskable": -1}, "field 'n_maskable' must be null or a whole number >= 0, found -1"),
    ({"n_maskable": True}, "field 'n_maskable' must be null or a whole number"),
    ({"mlm_head": {**FIT, "steps": "many"}}, "field 'mlm_head' must be null or an object of heldout"),
    ({"mlm_head": {**FIT, "surprise": 1}}, "field 'mlm_head' must be null or an object of heldout"),
    ({"components": [{"language": "jv"}]}, "field 'components' must be a list of objects of kind"),
    ({"components": [{"kind": "task", "scale": "x"}]}, "field 'components' must be a list of objects"),
    ({"ties": {"density": "a lot"}}, "field 'ties' must be null or an object of numbers"),
    ({"skipped_parameters": [1]}, "field 'skipped_parameters' must be a list of strings"),
    ({"train": [1]}, "field 'train' must be null or an object"),
    ({"license": 5}, "field 'license' must be a string"),
    ({"extra": {"n_maskable": "many"}}, "field 'extra.n_maskable' must be null or a whole number"),
    ({"extra": {"components": {}}}, "field 'extra.components' must be a list of objects"),
    ({"surprise": 1}, "unknown field 'surprise'"),
])
def test_a_mistyped_or_newer_config_is_one_error_naming_the_field(tmp_path, edit, says):
    folder = language_vector(full_meta()).save(tmp_path / "v")
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **edit}))
    with pytest.raises(VectorError, match=says) as e:
        SparseVector.load(folder)
    assert str(folder) in str(e.value)


def test_unknown_keys_in_extra_of_any_schema_are_kept_not_refused(tmp_path):
    folder = language_vector(full_meta()).save(tmp_path / "v")
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "extra": {"from_a_newer_tool": {"x": 1}}}))
    assert SparseVector.load(folder).meta.extra == {"from_a_newer_tool": {"x": 1}}
