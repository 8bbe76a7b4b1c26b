"""The artifacts that ship inside the package (fedscaled/artifacts/prebuilt/).

One entry per job shape a user gets with no build step: FedScale's own Android job files and the
example configs under configs/. Other shapes are built with ``python -m fedscaled_build JOBFILE``
(docs/mobile.md). tests/test_artifacts.py checks that every config here has its artifacts.
"""

from __future__ import annotations

from fedscaled.core.artifact_spec import ArtifactKey

PREBUILT: tuple[ArtifactKey, ...] = (
    # FedScale's android-tflite.yml and android-mnn.yml: linear, 32x32x3, 10 classes, batch 32, test 16.
    ArtifactKey("linear", (32, 32, 3), 10, 1.0, 32, 16),
    # configs/digits-*.yml: scikit-learn's digits (8x8x1), batch 16, test 32.
    ArtifactKey("linear", (8, 8, 1), 10, 1.0, 16, 32),
    ArtifactKey("mlp", (8, 8, 1), 10, 1.0, 16, 32),
    ArtifactKey("cnn", (8, 8, 1), 10, 1.0, 16, 32),
    # configs/mobilenetv3*.yml: MobileNetV3-Small, width 0.5, 32x32x3, batch 16, test 16.
    ArtifactKey("mobilenetv3", (32, 32, 3), 10, 0.5, 16, 16),
    ArtifactKey("mobilenetv3_finetune", (32, 32, 3), 10, 0.5, 16, 16),
)
