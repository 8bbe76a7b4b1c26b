"""The prebuilt on-device artifacts: present for every shipped config, clean, and numerically JAX's.

The agreement tests run one step of each program on the same weights and batch in JAX, in LiteRT
(the .tflite) and in MNN (the .mnn files) and compare every output. Tolerance: 1e-5 absolute on
weights and loss (float32 rounding of a step differs by ~1e-7 here; a wrong gradient differs by the
size of the update, 1e-3 and more), and 1e-5 relative on sums over a batch (test loss sum).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fedscaled.artifacts import PREBUILT_DIR
from fedscaled.core import artifact_spec as spec
from fedscaled.core import steps
from fedscaled.core.config import parse_job_text
from fedscaled.core.models import ModelDef
from fedscaled.device.backends import ArtifactBackend, JaxBackend
from fedscaled.device.litert_runner import LiteRTProgram
from fedscaled.device.mnn_runner import MNNProgram
from fedscaled.jobs.artifacts import ArtifactCatalog
from fedscaled_build.catalog import PREBUILT
from fedscaled_build.tflite import non_builtin_ops
from tests.daemon_proc import REPO, SHARED_FEDSCALE

ATOL = 1e-5
CATALOG = ArtifactCatalog([PREBUILT_DIR])


def _ids(key: spec.ArtifactKey) -> str:
    return key.slug()


def _job_files() -> list[Path]:
    files = sorted((REPO / "configs").glob("*.yml"))
    files = [f for f in files if "job_conf" in f.read_text()]
    if SHARED_FEDSCALE.is_dir():
        files += sorted(SHARED_FEDSCALE.glob("android-*.yml"))
    return files


@pytest.mark.parametrize("path", _job_files(), ids=lambda p: p.name)
def test_every_shipped_job_file_has_tflite_and_mnn_artifacts(path: Path) -> None:
    key = spec.key_of(parse_job_text(path.read_text()))
    assert key in PREBUILT, f"{path.name}: {key.slug()} is not in fedscaled_build/catalog.py"
    assert set(CATALOG.for_key(key)) == {"tflite", "mnn"}, f"{path.name}: artifacts of {key.slug()} missing"


def test_fedscale_android_configs_are_covered() -> None:
    if not SHARED_FEDSCALE.is_dir():
        pytest.skip("shared/fedscale is not beside the checkout")
    names = {p.name for p in _job_files()}
    assert {"android-tflite.yml", "android-mnn.yml"} <= names


def test_every_zoo_model_has_prebuilt_artifacts() -> None:
    from fedscaled.core.models import model_names

    assert {k.model for k in PREBUILT} == set(model_names())


@pytest.mark.parametrize("key", PREBUILT, ids=_ids)
def test_manifest_describes_the_models_tensors(key: spec.ArtifactKey) -> None:
    model = key.model_def()
    for backend in spec.BACKENDS:
        artifact = CATALOG.find(key, backend)
        assert artifact is not None, f"{key.slug()} {backend} missing or invalid"
        manifest = json.loads(artifact.manifest)
        assert [t["name"] for t in manifest["tensors"]] == [n for n, _ in model.specs]
        assert [tuple(t["shape"]) for t in manifest["tensors"]] == [s for _, s in model.specs]
        assert [t["name"] for t in manifest["frozen_tensors"]] == [n for n, _ in model.frozen_specs]
        train_inputs = [i["name"] for i in manifest["programs"]["train"]["inputs"]]
        assert train_inputs == [*(n for n, _ in model.frozen_specs), *(n for n, _ in model.specs),
                                "x", "y", "mask", "lr", "wd"]
        assert manifest["programs"]["train"]["batch_size"] == key.train_batch
        assert manifest["programs"]["test"]["batch_size"] == key.test_batch
        assert manifest["optimizer"] == steps.OPTIMIZER


@pytest.mark.parametrize("key", PREBUILT, ids=_ids)
def test_tflite_uses_builtin_ops_only(key: spec.ArtifactKey) -> None:
    artifact = CATALOG.find(key, "tflite")
    assert artifact is not None
    for name, data in artifact.files.items():
        assert non_builtin_ops(data) == [], f"{key.slug()} {name} needs non-builtin ops"


def test_op_check_catches_a_custom_op() -> None:
    artifact = CATALOG.find(PREBUILT[0], "tflite")
    assert artifact is not None
    # Rewrite the first operator code into a custom op named like a Flex op.
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytearray(artifact.files["model.tflite"]), 0))
    model.operatorCodes[0].builtinCode = schema.BuiltinOperator.CUSTOM
    model.operatorCodes[0].deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    model.operatorCodes[0].customCode = b"FlexMatMul"
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    assert non_builtin_ops(bytes(builder.Output())) == ["FlexMatMul"]


def _inputs(model: ModelDef, key: spec.ArtifactKey, program: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    b = key.batch(program)
    values: dict[str, np.ndarray] = {**model.init_frozen(3), **model.init(3)}
    values["x"] = rng.standard_normal((b, *model.input_shape)).astype(np.float32)
    values["y"] = rng.integers(0, model.num_classes, b).astype(np.int32)
    mask = np.ones(b, np.float32)
    mask[b // 2:] = 0.0 if b > 2 else 1.0  # a padded half batch
    values["mask"] = mask
    values["lr"] = np.array(0.05, np.float32)
    values["wd"] = np.array(4e-5, np.float32)
    return values


def _compare(program: str, expected: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str) -> None:
    for name, want in expected.items():
        tol = ATOL * max(1.0, float(np.max(np.abs(want)))) if program == steps.TEST else ATOL
        diff = float(np.max(np.abs(got[name] - want)))
        assert diff <= tol, f"{what} {program} output {name} differs from JAX by {diff:g}"


@pytest.mark.parametrize("key", PREBUILT, ids=_ids)
def test_one_step_agrees_in_jax_litert_and_mnn(key: spec.ArtifactKey) -> None:
    model = key.model_def()
    progs = steps.programs(model)
    tflite = CATALOG.find(key, "tflite")
    mnn = CATALOG.find(key, "mnn")
    assert tflite is not None and mnn is not None
    litert = LiteRTProgram(tflite.files["model.tflite"])
    manifest = json.loads(mnn.manifest)
    for name, prog in progs.items():
        values = _inputs(model, key, name)
        feed = {n: values[n] for n in prog.input_names}
        expected = dict(zip(prog.output_names, (np.asarray(o) for o in jax.jit(prog.fn)(*feed.values())),
                            strict=True))
        if name == steps.TRAIN:  # the step really moves every trainable tensor
            moved = [n for n in model_names(model) if np.array_equal(expected[steps.NEW_PREFIX + n], values[n])]
            assert not moved, f"{key.slug()}: train leaves {moved} unchanged"
        _compare(name, expected, litert.run(name, feed), f"{key.slug()} tflite")
        entry = manifest["programs"][name]
        graph = MNNProgram(mnn.files[entry["file"]], [i["name"] for i in entry["inputs"]],
                           [o["name"] for o in entry["outputs"]])
        _compare(name, expected, graph.run(feed), f"{key.slug()} mnn")


def model_names(model: ModelDef) -> list[str]:
    return [n for n, _ in model.specs]


@pytest.mark.parametrize("backend", spec.BACKENDS)
def test_local_training_through_an_artifact_matches_jax(backend: str) -> None:
    """Several steps with shuffling and a short last batch: the artifact backend follows the JAX trainer."""
    key = next(k for k in PREBUILT if k.model == "cnn")
    model = key.model_def()
    artifact = CATALOG.find(key, backend)
    assert artifact is not None
    through = ArtifactBackend(model, json.loads(artifact.manifest), artifact.files)
    reference = JaxBackend(model)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, 37).astype(np.int32)
    params = model.init(1)
    kwargs = {"lr": 0.1, "local_steps": 0, "batch_size": key.train_batch, "epochs": 2, "weight_decay": 1e-4,
              "seed": 9}
    new_a, loss_a, samples_a = through.train({}, params, x, y, **kwargs)  # type: ignore[arg-type]
    new_b, loss_b, samples_b = reference.train({}, params, x, y, **kwargs)  # type: ignore[arg-type]
    assert samples_a == samples_b == 37
    assert abs(loss_a - loss_b) < 1e-4
    for name in new_b:
        np.testing.assert_allclose(new_a[name], new_b[name], atol=1e-5)
    counts_a = through.evaluate({}, new_a, x, y, key.test_batch)
    counts_b = reference.evaluate({}, new_b, x, y, key.test_batch)
    assert (counts_a.samples, counts_a.correct_top1, counts_a.correct_top5) == \
        (counts_b.samples, counts_b.correct_top1, counts_b.correct_top5)
    assert abs(counts_a.loss_sum - counts_b.loss_sum) < 1e-3


def test_a_tampered_file_is_refused(tmp_path: Path) -> None:
    key = next(k for k in PREBUILT if k.model == "mlp")
    source = PREBUILT_DIR / key.slug() / "tflite"
    target = tmp_path / key.slug() / "tflite"
    target.mkdir(parents=True)
    for f in source.iterdir():
        data = f.read_bytes()
        (target / f.name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if f.suffix == ".tflite" else data)
    # The tampered copy comes first but is refused: the catalog falls back to the package's.
    catalog = ArtifactCatalog([tmp_path, PREBUILT_DIR])
    found = catalog.find(key, "tflite")
    assert found is not None and found.source == source
    assert ArtifactCatalog([tmp_path]).find(key, "tflite") is None
